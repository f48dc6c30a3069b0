//! Event streams on Kafka (any Kafka-protocol broker) through rdkafka: an idempotent producer
//! with `acks=all` and batching, consumer groups with explicit commits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Mutex, OnceCell};

use super::{Envelope, EventStream, GroupConsumer, Receipt, Record, Topic, check_group, check_key};
use crate::error::{Error, Result};

/// How to reach the broker (in configuration files the timeout is `delivery_timeout_ms`;
/// `settings` may hold secrets and are never logged).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap: String,
    /// Put before every topic and group name (`staging.` → `staging.agent.audit`); Kafka's
    /// legal characters only.
    #[serde(default)]
    pub topic_prefix: String,
    /// Partitions of the topics this client creates when they are missing.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// How long a publish may wait for the broker before it fails. Zero: never give up
    /// (the producer retries in order until the broker is back), which is what the stream
    /// behind an `Outbox` should use to keep per-key order across an outage.
    #[serde(
        rename = "delivery_timeout_ms",
        with = "crate::serde_ms",
        default = "default_delivery_timeout"
    )]
    pub delivery_timeout: Duration,
    /// Further librdkafka settings (`security.protocol`, `sasl.*`, ...). Never logged.
    #[serde(default)]
    pub settings: Vec<(String, String)>,
}

fn default_partitions() -> i32 {
    3
}

fn default_delivery_timeout() -> Duration {
    Duration::from_secs(30)
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("settings", &format_args!("{} hidden", self.settings.len()))
            .finish()
    }
}

impl KafkaConfig {
    /// A config for `bootstrap` with no prefix, 3 partitions and a 30 s delivery timeout.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            topic_prefix: String::new(),
            partitions: default_partitions(),
            delivery_timeout: default_delivery_timeout(),
            settings: Vec::new(),
        }
    }

    /// The limit of one admin or metadata request: the delivery timeout, or 30 s when
    /// deliveries never time out.
    fn request_timeout(&self) -> Duration {
        if self.delivery_timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            self.delivery_timeout
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c
    }
}

/// The Kafka [`EventStream`].
#[derive(Clone)]
pub struct KafkaStream {
    inner: Arc<Inner>,
}

type SharedReader = Arc<Mutex<Reader>>;

struct Reader {
    consumer: StreamConsumer,
    next: Option<u64>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
    /// One consumer per partition read by offset, with the offset it will deliver next.
    readers: Mutex<HashMap<(Topic, u32), SharedReader>>,
    admin: AdminClient<DefaultClientContext>,
    topics_ready: OnceCell<()>,
}

impl std::fmt::Debug for KafkaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStream")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn valid_prefix(prefix: &str) -> bool {
    prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl KafkaStream {
    /// A client for `config`. It does not wait for the broker: the five topics are created
    /// (when missing) on first use, so a node starts while its broker is down.
    pub fn new(config: KafkaConfig) -> Result<Self> {
        if !valid_prefix(&config.topic_prefix) || config.topic_prefix.len() > 200 {
            return Err(Error::Invalid {
                what: "topic prefix",
                value: config.topic_prefix.chars().take(64).collect(),
                reason: "may hold only ASCII letters, digits, '.', '_' and '-' (at most 200)",
            });
        }
        if config.partitions < 1 {
            return Err(Error::Invalid {
                what: "partitions",
                value: config.partitions.to_string(),
                reason: "must be at least 1",
            });
        }
        let server = |e: KafkaError| server_error(&config, e);
        // librdkafka reads 0 as "no limit".
        let timeout_ms = config.delivery_timeout.as_millis().to_string();
        let producer: FutureProducer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", &timeout_ms)
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(server)?;
        let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(server)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                readers: Mutex::new(HashMap::new()),
                admin,
                topics_ready: OnceCell::new(),
            }),
        })
    }

    /// Creates the five topics when they are missing (once per client; retried after an
    /// error).
    pub async fn ensure_topics(&self) -> Result<()> {
        self.inner
            .topics_ready
            .get_or_try_init(|| self.create_topics())
            .await
            .map(|_| ())
    }

    async fn create_topics(&self) -> Result<()> {
        let config = &self.inner.config;
        let names: Vec<String> = Topic::ALL.iter().map(|t| self.topic_name(*t)).collect();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, config.partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(config.request_timeout()))
            .request_timeout(Some(config.request_timeout()));
        let results = self
            .inner
            .admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| self.error(e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::Server {
                        server: "kafka",
                        address: config.bootstrap.clone(),
                        detail: format!("cannot create topic {name}: {code}"),
                    });
                }
            }
        }
        Ok(())
    }

    fn topic_name(&self, topic: Topic) -> String {
        format!("{}{}", self.inner.config.topic_prefix, topic.name())
    }

    fn error(&self, e: KafkaError) -> Error {
        server_error(&self.inner.config, e)
    }

    fn check(topic: Topic, key: &str, envelope: &Envelope) -> Result<Vec<u8>> {
        check_key(key)?;
        envelope.validate()?;
        if envelope.topic()? != topic {
            return Err(Error::Invalid {
                what: "event schema",
                value: envelope.schema.clone(),
                reason: "belongs to another topic",
            });
        }
        serde_json::to_vec(envelope).map_err(|_| Error::Invalid {
            what: "event",
            value: envelope.id.clone(),
            reason: "does not serialize to JSON",
        })
    }

    async fn check_partition(&self, topic: Topic, partition: u32) -> Result<()> {
        let n = self.partitions(topic).await?;
        if partition >= n {
            return Err(Error::Invalid {
                what: "partition",
                value: partition.to_string(),
                reason: "is not a partition of the topic",
            });
        }
        Ok(())
    }
}

fn server_error(config: &KafkaConfig, e: KafkaError) -> Error {
    Error::Server {
        server: "kafka",
        address: config.bootstrap.clone(),
        detail: e.to_string(),
    }
}

fn decode(topic: Topic, m: &impl Message) -> Result<Record> {
    let bad = |detail: String| Error::Schema {
        id: format!("{}@{}:{}", topic, m.partition(), m.offset()),
        found: "bytes".into(),
        expected: "an event envelope".into(),
        detail,
    };
    let key = m
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default();
    let payload = m.payload().ok_or_else(|| bad("empty message".into()))?;
    let envelope: Envelope = serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
    Ok(Record {
        topic,
        partition: u32::try_from(m.partition()).unwrap_or(0),
        offset: u64::try_from(m.offset()).unwrap_or(0),
        key,
        envelope,
    })
}

/// Collects up to `max` messages: the first within `wait`, the rest while they keep coming.
/// Messages `keep` refuses (fetched for an earlier assignment) are dropped, not counted.
async fn collect(
    consumer: &StreamConsumer,
    topic: Topic,
    max: usize,
    wait: Duration,
    config: &KafkaConfig,
    keep: impl Fn(&Record) -> bool,
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    // librdkafka reports lost connections through the consumer and reconnects by itself:
    // keep waiting, and report the error only if nothing arrived in time.
    let mut transient = None;
    let deadline = super::deadline(wait);
    while out.len() < max {
        let until = if out.is_empty() {
            deadline
        } else {
            tokio::time::Instant::now() + Duration::from_millis(5)
        };
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::PartitionEOF),
            ))) => {
                tracing::debug!(%code, "kafka consumer reports a transient error");
                transient = Some(KafkaError::MessageConsumption(code));
            }
            // What was already received is returned; the error comes back on the next call
            // if it persists.
            Ok(Err(e)) if !out.is_empty() => {
                tracing::debug!(error = %e, "kafka consumer error after records; returning them");
                break;
            }
            Ok(Err(e)) => return Err(server_error(config, e)),
            Ok(Ok(m)) => match decode(topic, &m) {
                Ok(record) => {
                    if keep(&record) {
                        out.push(record);
                    }
                }
                // Not one of ours (another producer wrote to the topic): skipped, counted and
                // logged with its position, never allowed to block the records after it.
                Err(e) => {
                    metrics::counter!("soma_adapters_events_undecodable_total", "topic" => topic.name())
                        .increment(1);
                    tracing::warn!(%topic, partition = m.partition(), offset = m.offset(), error = %e, "skipping a message that is not an event envelope");
                }
            },
        }
    }
    match transient {
        Some(e)
            if out.is_empty()
                && !matches!(
                    e,
                    KafkaError::MessageConsumption(RDKafkaErrorCode::PartitionEOF)
                ) =>
        {
            Err(server_error(config, e))
        }
        _ => Ok(out),
    }
}

#[async_trait]
impl EventStream for KafkaStream {
    #[tracing::instrument(level = "debug", skip(self, envelope), fields(backend = "kafka", id = %envelope.id))]
    async fn publish(&self, topic: Topic, key: &str, envelope: &Envelope) -> Result<Receipt> {
        let mut receipts = self
            .publish_batch(topic, &[(key.to_owned(), envelope.clone())])
            .await?;
        receipts.pop().ok_or_else(|| Error::Server {
            server: "kafka",
            address: self.inner.config.bootstrap.clone(),
            detail: "no delivery report".into(),
        })
    }

    async fn publish_batch(
        &self,
        topic: Topic,
        events: &[(String, Envelope)],
    ) -> Result<Vec<Receipt>> {
        let payloads = events
            .iter()
            .map(|(k, e)| Self::check(topic, k, e))
            .collect::<Result<Vec<_>>>()?;
        self.ensure_topics().await?;
        let name = self.topic_name(topic);
        let mut pending = Vec::with_capacity(events.len());
        for ((key, envelope), payload) in events.iter().zip(&payloads) {
            let headers = OwnedHeaders::new().insert(Header {
                key: "soma-id",
                value: Some(envelope.id.as_bytes()),
            });
            let mut record = FutureRecord::to(&name)
                .key(key.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            loop {
                match self.inner.producer.send_result(record) {
                    Ok(delivery) => break pending.push(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.inner.producer.poll(Duration::from_millis(1));
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(self.error(e)),
                }
            }
        }
        let mut receipts = Vec::with_capacity(pending.len());
        for delivery in pending {
            match delivery.await {
                Ok(Ok(d)) => receipts.push(Receipt {
                    partition: u32::try_from(d.partition).unwrap_or(0),
                    offset: u64::try_from(d.offset).unwrap_or(0),
                    duplicate: false,
                }),
                Ok(Err((e, _))) => return Err(self.error(e)),
                Err(_) => return Err(self.error(KafkaError::Canceled)),
            }
        }
        metrics::counter!("soma_adapters_events_published_total", "backend" => "kafka", "topic" => topic.name(), "duplicate" => "false")
            .increment(receipts.len() as u64);
        Ok(receipts)
    }

    async fn partitions(&self, topic: Topic) -> Result<u32> {
        self.ensure_topics().await?;
        let name = self.topic_name(topic);
        let inner = self.inner.clone();
        let timeout = self.inner.config.request_timeout();
        let meta = tokio::task::spawn_blocking(move || {
            inner.producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|_| self.error(KafkaError::Canceled))?
        .map_err(|e| self.error(e))?;
        let n = meta
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>> {
        self.check_partition(topic, partition).await?;
        let offset = i64::try_from(from).map_err(|_| Error::Invalid {
            what: "offset",
            value: from.to_string(),
            reason: "is beyond Kafka's offsets",
        })?;
        let slot = {
            let mut readers = self.inner.readers.lock().await;
            match readers.get(&(topic, partition)) {
                Some(r) => r.clone(),
                None => {
                    let config = &self.inner.config;
                    let consumer: StreamConsumer = config
                        .client()
                        .set("group.id", format!("{}soma-reader", config.topic_prefix))
                        // An offset the broker calls out of range must not jump to the end.
                        .set("auto.offset.reset", "earliest")
                        .set("enable.auto.commit", "false")
                        .set("enable.auto.offset.store", "false")
                        .create()
                        .map_err(|e| self.error(e))?;
                    let r = Arc::new(Mutex::new(Reader {
                        consumer,
                        next: None,
                    }));
                    readers.insert((topic, partition), r.clone());
                    r
                }
            }
        };
        let mut reader = slot.lock().await;
        // Unknown until this read completes: a read cancelled half-way must make the next one
        // re-assign rather than continue from wherever the consumer got to.
        let continuing = reader.next.take() == Some(from);
        // A read that continues where the last one ended keeps fetching; any other
        // position re-assigns the partition there.
        if !continuing {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(
                &self.topic_name(topic),
                partition as i32,
                Offset::Offset(offset),
            )
            .map_err(|e| self.error(e))?;
            reader.consumer.assign(&tpl).map_err(|e| self.error(e))?;
        }
        let expected = std::sync::atomic::AtomicU64::new(from);
        // Offsets only move forward: anything before the position (fetched for an earlier
        // one) is dropped.
        let records = collect(
            &reader.consumer,
            topic,
            max,
            wait,
            &self.inner.config,
            |r| {
                let keep = r.partition == partition
                    && r.offset >= expected.load(std::sync::atomic::Ordering::Relaxed);
                if keep {
                    expected.store(r.offset + 1, std::sync::atomic::Ordering::Relaxed);
                }
                keep
            },
        )
        .await;
        if let Ok(rs) = &records {
            reader.next = Some(rs.last().map_or(from, |last| last.offset + 1));
        }
        records
    }

    async fn consumer(&self, group: &str, topic: Topic) -> Result<Box<dyn GroupConsumer>> {
        check_group(group)?;
        self.ensure_topics().await?;
        let config = &self.inner.config;
        let consumer: StreamConsumer = config
            .client()
            .set("group.id", format!("{}{group}", config.topic_prefix))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()
            .map_err(|e| self.error(e))?;
        consumer
            .subscribe(&[&self.topic_name(topic)])
            .map_err(|e| self.error(e))?;
        Ok(Box::new(KafkaConsumer {
            consumer: Arc::new(consumer),
            topic,
            name: self.topic_name(topic),
            config: config.clone(),
        }))
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer>,
    topic: Topic,
    name: String,
    config: KafkaConfig,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topic", &self.name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl GroupConsumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        collect(&self.consumer, self.topic, max, wait, &self.config, |_| {
            true
        })
        .await
    }

    async fn commit(&mut self, records: &[Record]) -> Result<()> {
        let mut next = std::collections::BTreeMap::new();
        for r in records.iter().filter(|r| r.topic == self.topic) {
            let e = next.entry(r.partition).or_insert(0u64);
            *e = (*e).max(r.offset + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(&self.name, p as i32, Offset::Offset(o as i64))
                .map_err(|e| server_error(&self.config, e))?;
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|_| server_error(&self.config, KafkaError::Canceled))?
            .map_err(|e| server_error(&self.config, e))
    }
}
