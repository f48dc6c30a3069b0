//! The outbox: publishing goes to the embedded log (durable, acknowledged at once) and a
//! forwarder per topic copies the log to the server backend in order, retrying with backoff
//! while the server is down. Reads and consumer groups go to the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::{Envelope, EventStream, GroupConsumer, Receipt, Record, SledLog, Topic};
use crate::error::Result;

/// How the outbox forwards (in configuration files the delays are `min_backoff_ms` and
/// `max_backoff_ms`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxOptions {
    /// Events per forwarded batch.
    pub batch: usize,
    /// The first retry delay after a failed forward.
    #[serde(rename = "min_backoff_ms", with = "crate::serde_ms")]
    pub min_backoff: Duration,
    /// The longest retry delay.
    #[serde(rename = "max_backoff_ms", with = "crate::serde_ms")]
    pub max_backoff: Duration,
    /// Remove forwarded events from the embedded log (their ids are then no longer
    /// recognised as duplicates by it).
    pub trim_forwarded: bool,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        Self {
            batch: 1000,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            trim_forwarded: true,
        }
    }
}

impl OutboxOptions {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, value: String, reason: &'static str| {
            Err(crate::error::Error::Invalid {
                what,
                value,
                reason,
            })
        };
        if self.batch == 0 {
            return bad("outbox.batch", "0".into(), "must be at least 1");
        }
        if self.min_backoff.is_zero() {
            return bad("outbox.min_backoff_ms", "0".into(), "must be at least 1");
        }
        if self.max_backoff < self.min_backoff {
            return bad(
                "outbox.max_backoff_ms",
                self.max_backoff.as_millis().to_string(),
                "must not be below min_backoff_ms",
            );
        }
        Ok(())
    }
}

/// An [`EventStream`] that accepts events while its server is down and forwards them, in
/// order, once it is back. Nothing acknowledged is lost: an event is acknowledged once it is
/// in the embedded log, and leaves the log only after the server acknowledged it.
/// Forwarding is at least once: an event may reach the server twice (after a failed batch or
/// a crash between the server's acknowledgement and the cursor's write); consumers drop the
/// second copy by its id.
#[derive(Debug)]
pub struct Outbox {
    local: SledLog,
    server: Arc<dyn EventStream>,
    cursors: Arc<[AtomicU64; 5]>,
    tasks: Vec<JoinHandle<()>>,
}

impl Outbox {
    /// Starts forwarding `local` to `server` (one task per topic, on the current tokio
    /// runtime; outside one this is an error).
    pub fn start(
        local: SledLog,
        server: Arc<dyn EventStream>,
        options: OutboxOptions,
    ) -> Result<Self> {
        options.validate()?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(crate::error::Error::Invalid {
                what: "runtime",
                value: "none".into(),
                reason: "Outbox::start must be called inside a tokio runtime",
            });
        };
        let cursors: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
        let mut tasks = Vec::new();
        for topic in Topic::ALL {
            let cursor = local.cursor(topic)?;
            cursors[usize::from(topic.index())].store(cursor, Ordering::SeqCst);
            tasks.push(runtime.spawn(forward(
                local.clone(),
                server.clone(),
                topic,
                cursors.clone(),
                options.clone(),
            )));
        }
        Ok(Self {
            local,
            server,
            cursors,
            tasks,
        })
    }

    /// Events of `topic` accepted but not yet acknowledged by the server.
    pub fn pending(&self, topic: Topic) -> u64 {
        let cursor = self.cursors[usize::from(topic.index())].load(Ordering::SeqCst);
        self.local.end_offset(topic).saturating_sub(cursor)
    }

    /// Waits until every accepted event was forwarded; false if `timeout` passed first.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = super::deadline(timeout);
        loop {
            if Topic::ALL.iter().all(|t| self.pending(*t) == 0) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn forward(
    local: SledLog,
    server: Arc<dyn EventStream>,
    topic: Topic,
    cursors: Arc<[AtomicU64; 5]>,
    options: OutboxOptions,
) {
    let slot = &cursors[usize::from(topic.index())];
    let mut durable = local.subscribe(topic);
    let mut backoff = options.min_backoff;
    loop {
        durable.borrow_and_update();
        let cursor = slot.load(Ordering::SeqCst);
        let batch = match local
            .read(topic, 0, cursor, options.batch.max(1), Duration::ZERO)
            .await
        {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(%topic, error = %e, "outbox cannot read the embedded log");
                tokio::time::sleep(options.max_backoff).await;
                continue;
            }
        };
        let Some(last) = batch.last().map(|r| r.offset) else {
            metrics::gauge!("soma_adapters_outbox_pending_events", "topic" => topic.name())
                .set(0.0);
            if durable.changed().await.is_err() {
                return;
            }
            continue;
        };
        let events: Vec<(String, Envelope)> =
            batch.into_iter().map(|r| (r.key, r.envelope)).collect();
        match server.publish_batch(topic, &events).await {
            Ok(_) => {
                backoff = options.min_backoff;
                slot.store(last + 1, Ordering::SeqCst);
                metrics::counter!("soma_adapters_outbox_forwarded_total", "topic" => topic.name())
                    .increment(events.len() as u64);
                metrics::gauge!("soma_adapters_outbox_pending_events", "topic" => topic.name())
                    .set(local.end_offset(topic).saturating_sub(last + 1) as f64);
                if let Err(e) = local.set_cursor(topic, last + 1).await {
                    // The events will be forwarded again after a restart: duplicates, not loss.
                    tracing::warn!(%topic, error = %e, "outbox cannot store its cursor");
                    continue;
                }
                if options.trim_forwarded
                    && let Err(e) = local.trim_before(topic, last + 1).await
                {
                    tracing::warn!(%topic, error = %e, "outbox cannot trim forwarded events");
                }
            }
            Err(e) => {
                metrics::counter!("soma_adapters_outbox_forward_errors_total", "topic" => topic.name())
                    .increment(1);
                tracing::warn!(%topic, error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox forward failed; retrying");
                let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(options.max_backoff);
            }
        }
    }
}

#[async_trait]
impl EventStream for Outbox {
    async fn publish(&self, topic: Topic, key: &str, envelope: &Envelope) -> Result<Receipt> {
        self.local.publish(topic, key, envelope).await
    }

    async fn publish_batch(
        &self,
        topic: Topic,
        events: &[(String, Envelope)],
    ) -> Result<Vec<Receipt>> {
        self.local.publish_batch(topic, events).await
    }

    async fn partitions(&self, topic: Topic) -> Result<u32> {
        self.server.partitions(topic).await
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>> {
        self.server.read(topic, partition, from, max, wait).await
    }

    async fn consumer(&self, group: &str, topic: Topic) -> Result<Box<dyn GroupConsumer>> {
        self.server.consumer(group, topic).await
    }
}
