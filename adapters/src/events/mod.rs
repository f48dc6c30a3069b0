//! Event streams: publish versioned events to named topics, read them back from an offset or
//! through a consumer group.
//!
//! Delivery is at least once. Every event carries an idempotency key ([`Envelope::id`]): the
//! embedded log refuses a second event with an id it still holds, and consumers drop the
//! duplicates a server backend can deliver after a retry with [`Dedup`].

#[cfg(any(test, feature = "test-util"))]
pub mod contract;
#[cfg(feature = "kafka")]
mod kafka;
mod log;
mod outbox;
mod schema;

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::episodic::check_id;
use crate::error::{Error, Result};

#[cfg(feature = "kafka")]
pub use self::kafka::{KafkaConfig, KafkaStream};
pub use self::log::SledLog;
pub use self::outbox::{Outbox, OutboxOptions};
pub use self::schema::{
    AuditEvent, ConversationEvent, Outcome, PolicyDecision, SlmRequest, TopicEvent, TrainingAudit,
};

/// The largest payload an event may carry, in encoded bytes.
pub const MAX_PAYLOAD_BYTES: usize = 900_000;

/// A deadline `wait` from now; an unrepresentable one (`Duration::MAX`) is a year away.
pub(crate) fn deadline(wait: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// The topics of the runtime. Each has one documented, versioned payload schema
/// (`docs/events.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Topic {
    /// `agent.audit`: every action an actor took or was refused.
    AgentAudit,
    /// `conversation.events`: messages and tool calls of sessions.
    ConversationEvents,
    /// `slm.requests`: requests to local models.
    SlmRequests,
    /// `training.audit`: what went into (or was erased from) training data.
    TrainingAudit,
    /// `policy.decisions`: constitution (Rego) decisions.
    PolicyDecisions,
}

impl Topic {
    /// Every topic.
    pub const ALL: [Topic; 5] = [
        Topic::AgentAudit,
        Topic::ConversationEvents,
        Topic::SlmRequests,
        Topic::TrainingAudit,
        Topic::PolicyDecisions,
    ];

    /// The topic's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Topic::AgentAudit => "agent.audit",
            Topic::ConversationEvents => "conversation.events",
            Topic::SlmRequests => "slm.requests",
            Topic::TrainingAudit => "training.audit",
            Topic::PolicyDecisions => "policy.decisions",
        }
    }

    /// The topic with this name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::Invalid {
                what: "topic",
                value: name.chars().take(64).collect(),
                reason: "is not one of agent.audit, conversation.events, slm.requests, \
                         training.audit, policy.decisions",
            })
    }

    pub(crate) fn index(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One event as published: who, when, which schema, and the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The idempotency key: the same event published twice has the same id.
    pub id: String,
    /// `<topic>/v<version>`, e.g. `agent.audit/v1`.
    pub schema: String,
    /// The tenant the event belongs to.
    pub tenant: String,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The payload, in the topic's schema.
    pub payload: serde_json::Value,
}

impl Envelope {
    /// An envelope for a typed event.
    pub fn new<E: TopicEvent>(
        id: impl Into<String>,
        tenant: impl Into<String>,
        at_ms: u64,
        event: &E,
    ) -> Result<Self> {
        let envelope = Self {
            id: id.into(),
            schema: schema::schema_name::<E>(),
            tenant: tenant.into(),
            at_ms,
            payload: serde_json::to_value(event).map_err(|e| Error::Invalid {
                what: "event",
                value: E::TOPIC.name().into(),
                reason: unserializable(e),
            })?,
        };
        envelope.validate()?;
        Ok(envelope)
    }

    /// The payload as the typed event of its schema; an error names a schema mismatch.
    pub fn decode<E: TopicEvent>(&self) -> Result<E> {
        schema::decode(self)
    }

    /// The topic named by the schema.
    pub fn topic(&self) -> Result<Topic> {
        schema::topic_of(&self.schema)
    }

    /// Checks ids, the schema name and the size; backends call it before accepting an event.
    pub fn validate(&self) -> Result<()> {
        check_id("event id", &self.id)?;
        check_id("tenant", &self.tenant)?;
        schema::topic_of(&self.schema)?;
        let size = serde_json::to_vec(&self.payload).map_or(usize::MAX, |v| v.len());
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::Invalid {
                what: "event payload",
                value: format!("{size} bytes"),
                reason: "is larger than 900,000 bytes (Kafka's default message limit is 1 MB)",
            });
        }
        Ok(())
    }

    /// The idempotency key scoped to the tenant: two tenants' events never collide.
    pub fn dedup_key(&self) -> String {
        format!("{}:{}:{}", self.tenant.len(), self.tenant, self.id)
    }
}

/// Logs why an event does not serialize; the error itself carries a fixed reason.
fn unserializable(e: serde_json::Error) -> &'static str {
    tracing::debug!(error = %e, "event does not serialize");
    "does not serialize to JSON"
}

/// An event as read back from a topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The topic.
    pub topic: Topic,
    /// The partition (always 0 in the embedded log).
    pub partition: u32,
    /// The offset within the partition.
    pub offset: u64,
    /// The key events are partitioned (and so ordered) by.
    pub key: String,
    /// The event.
    pub envelope: Envelope,
}

/// Where a published event was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The partition.
    pub partition: u32,
    /// The offset within the partition.
    pub offset: u64,
    /// True when the store already held an event with this id (nothing was written).
    pub duplicate: bool,
}

/// An event stream backend.
#[async_trait]
pub trait EventStream: Send + Sync + fmt::Debug + 'static {
    /// Publishes one event under `key`; returns once it is durable (acknowledged).
    async fn publish(&self, topic: Topic, key: &str, envelope: &Envelope) -> Result<Receipt>;

    /// Publishes events in order; returns once all are durable. On an error some of them may
    /// have been stored: publishing them again is safe (their ids identify them).
    async fn publish_batch(
        &self,
        topic: Topic,
        events: &[(String, Envelope)],
    ) -> Result<Vec<Receipt>> {
        let mut out = Vec::with_capacity(events.len());
        for (key, envelope) in events {
            out.push(self.publish(topic, key, envelope).await?);
        }
        Ok(out)
    }

    /// How many partitions the topic has.
    async fn partitions(&self, topic: Topic) -> Result<u32>;

    /// Up to `max` events of a partition from offset `from` on, waiting up to `wait` for the
    /// first one when none is there yet.
    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>>;

    /// A consumer of `topic` in consumer group `group`: it starts after the group's last
    /// commit (or at the beginning) and sees every partition the group gives it.
    async fn consumer(&self, group: &str, topic: Topic) -> Result<Box<dyn GroupConsumer>>;
}

/// A consumer in a group. What it has not committed is delivered again to the group's next
/// consumer.
#[async_trait]
pub trait GroupConsumer: Send + fmt::Debug {
    /// Up to `max` events, waiting up to `wait` for the first.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>>;

    /// Commits the group's position past every record given (per partition, the highest).
    async fn commit(&mut self, records: &[Record]) -> Result<()>;
}

/// Remembers the last `capacity` events (tenant and id) seen, to drop duplicates on the consumer side.
#[derive(Debug)]
pub struct Dedup {
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Dedup {
    /// A window of `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True the first time an event (its tenant and id) is seen within the window, false
    /// for a duplicate.
    pub fn first_time(&mut self, envelope: &Envelope) -> bool {
        let id = envelope.dedup_key();
        if self.seen.contains(&id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(id.clone());
        self.order.push_back(id);
        true
    }
}

pub(crate) fn check_key(key: &str) -> Result<()> {
    check_id("event key", key)
}

pub(crate) fn check_group(group: &str) -> Result<()> {
    check_id("consumer group", group)
}
