//! The embedded event log on sled: one partition per topic, offsets from 0, an idempotency
//! index, consumer-group positions, and the outbox's forwarding cursor.
//!
//! Keys: `r|topic|offset` → record, `i|topic|id` → offset, `g|topic|group` → next offset of
//! the group, `c|topic` → next offset to forward, `h|topic` → first offset still held.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Envelope, EventStream, GroupConsumer, Receipt, Record, Topic, check_group, check_key};
use crate::error::{Error, Result};

const RECORD: u8 = b'r';
const ID: u8 = b'i';
const GROUP: u8 = b'g';
const CURSOR: u8 = b'c';
const HEAD: u8 = b'h';

/// The embedded [`EventStream`]: a durable log per topic on sled. Publishing returns once the
/// event is on disk; readers only ever see durable events.
#[derive(Debug, Clone)]
pub struct SledLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    path: PathBuf,
    topics: Vec<TopicLog>,
}

#[derive(Debug)]
struct TopicLog {
    /// The next offset to hand out; held while a record is written so offsets are dense.
    next: Mutex<u64>,
    /// The end of the durable prefix (one past the last durable offset).
    durable: watch::Sender<u64>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    envelope: Envelope,
}

fn key(kind: u8, topic: Topic, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + rest.len());
    k.push(kind);
    k.push(topic.index());
    k.extend_from_slice(rest);
    k
}

fn offset_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl SledLog {
    /// Opens (or creates) the log in directory `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = crate::store::open_sled(&path)?;
        let mut topics = Vec::new();
        for topic in Topic::ALL {
            let store = |e| Error::Store {
                path: path.clone(),
                source: Box::new(e),
            };
            let last = db.scan_prefix(key(RECORD, topic, &[])).next_back();
            let after_last = match last {
                Some(item) => {
                    let (k, _) = item.map_err(store)?;
                    k.get(2..)
                        .and_then(offset_of)
                        .ok_or_else(|| Error::Corrupt {
                            path: path.clone(),
                            detail: format!("record key of {topic} has a bad offset"),
                        })?
                        + 1
                }
                None => 0,
            };
            // Offsets never go back: not below the trimmed head nor the forwarding cursor.
            let mut next = after_last;
            for marker in [HEAD, CURSOR] {
                if let Some(v) = db.get(key(marker, topic, &[])).map_err(store)? {
                    next = next.max(offset_of(&v).unwrap_or(0));
                }
            }
            topics.push(TopicLog {
                next: Mutex::new(next),
                durable: watch::Sender::new(next),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner { db, path, topics }),
        })
    }

    /// One past the last durable offset of the topic.
    pub fn end_offset(&self, topic: Topic) -> u64 {
        *self.inner.topic(topic).durable.borrow()
    }

    /// Removes the topic's records before `offset` (and their idempotency entries); durable on
    /// return. Ids of removed records are no longer recognised as duplicates.
    pub async fn trim_before(&self, topic: Topic, offset: u64) -> Result<u64> {
        let inner = self.inner.clone();
        let n = tokio::task::spawn_blocking(move || inner.trim(topic, offset))
            .await
            .map_err(|e| self.inner.store(e))??;
        self.flush().await?;
        Ok(n)
    }

    pub(crate) fn cursor(&self, topic: Topic) -> Result<u64> {
        let v = self
            .inner
            .db
            .get(key(CURSOR, topic, &[]))
            .map_err(|e| self.inner.store(e))?;
        Ok(v.and_then(|v| offset_of(&v)).unwrap_or(0))
    }

    pub(crate) async fn set_cursor(&self, topic: Topic, next: u64) -> Result<()> {
        let inner = &self.inner;
        inner
            .db
            .insert(key(CURSOR, topic, &[]), &next.to_be_bytes())
            .map_err(|e| inner.store(e))?;
        self.flush().await
    }

    pub(crate) fn subscribe(&self, topic: Topic) -> watch::Receiver<u64> {
        self.inner.topic(topic).durable.subscribe()
    }

    async fn flush(&self) -> Result<()> {
        crate::store::flush_sled(&self.inner.db)
            .await
            .map_err(|e| self.inner.store(e))
    }

    /// Checks an event and encodes it as stored.
    fn encode(&self, topic: Topic, key_: &str, envelope: &Envelope) -> Result<Vec<u8>> {
        check_key(key_)?;
        envelope.validate()?;
        if envelope.topic()? != topic {
            return Err(Error::Invalid {
                what: "event schema",
                value: envelope.schema.clone(),
                reason: "belongs to another topic",
            });
        }
        serde_json::to_vec(&Stored {
            key: key_.to_owned(),
            envelope: envelope.clone(),
        })
        .map_err(|e| self.inner.store(e))
    }

    /// Writes encoded events in order as one atomic batch; an id already held (or repeated
    /// within the batch) is not written again and its receipt says so.
    fn publish_now(&self, topic: Topic, events: Vec<(&Envelope, Vec<u8>)>) -> Result<Vec<Receipt>> {
        let inner = &self.inner;
        let log = inner.topic(topic);
        let mut next = log.next.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = sled::Batch::default();
        let mut fresh: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let mut receipts = Vec::with_capacity(events.len());
        let mut offset = *next;
        for (envelope, value) in events {
            let dedup = envelope.dedup_key();
            let id_key = key(ID, topic, dedup.as_bytes());
            let held = match fresh.get(&dedup) {
                Some(o) => Some(*o),
                None => match inner.db.get(&id_key).map_err(|e| inner.store(e))? {
                    Some(v) => Some(offset_of(&v).ok_or_else(|| Error::Corrupt {
                        path: inner.path.clone(),
                        detail: format!("idempotency entry of {topic} has a bad offset"),
                    })?),
                    None => None,
                },
            };
            if let Some(existing) = held {
                receipts.push(Receipt {
                    partition: 0,
                    offset: existing,
                    duplicate: true,
                });
                continue;
            }
            batch.insert(key(RECORD, topic, &offset.to_be_bytes()), value);
            batch.insert(id_key, &offset.to_be_bytes());
            fresh.insert(dedup, offset);
            receipts.push(Receipt {
                partition: 0,
                offset,
                duplicate: false,
            });
            offset += 1;
        }
        inner.db.apply_batch(batch).map_err(|e| inner.store(e))?;
        *next = offset;
        Ok(receipts)
    }

    /// Marks offsets up to `end` durable (after a flush that covered them).
    fn made_durable(&self, topic: Topic, end: u64) {
        self.inner.topic(topic).durable.send_if_modified(|d| {
            let moved = end > *d;
            *d = (*d).max(end);
            moved
        });
    }

    fn read_now(&self, topic: Topic, from: u64, max: usize) -> Result<Vec<Record>> {
        let inner = &self.inner;
        let end = *inner.topic(topic).durable.borrow();
        if from >= end {
            return Ok(Vec::new());
        }
        // From `from` (or the first record still held after a trim) to the durable end.
        let range = key(RECORD, topic, &from.to_be_bytes())..key(RECORD, topic, &end.to_be_bytes());
        inner
            .db
            .range(range)
            .take(max)
            .map(|item| {
                let (k, v) = item.map_err(|e| inner.store(e))?;
                let offset = k.get(2..).and_then(offset_of);
                let stored: Option<Stored> = serde_json::from_slice(&v).ok();
                match (offset, stored) {
                    (Some(offset), Some(s)) => Ok(Record {
                        topic,
                        partition: 0,
                        offset,
                        key: s.key,
                        envelope: s.envelope,
                    }),
                    _ => Err(Error::Corrupt {
                        path: inner.path.clone(),
                        detail: format!("record of {topic} cannot be decoded"),
                    }),
                }
            })
            .collect()
    }

    async fn read_waiting(
        &self,
        topic: Topic,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>> {
        let mut durable = self.subscribe(topic);
        let deadline = super::deadline(wait);
        loop {
            // Mark the current end as seen before reading, so an event made durable after
            // the read wakes the wait below.
            durable.borrow_and_update();
            let records = self.read_now(topic, from, max)?;
            if !records.is_empty() || max == 0 {
                return Ok(records);
            }
            match tokio::time::timeout_at(deadline, durable.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Ok(Vec::new()),
            }
        }
    }
}

impl Inner {
    fn topic(&self, topic: Topic) -> &TopicLog {
        &self.topics[usize::from(topic.index())]
    }

    fn store(&self, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Store {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    /// Removes records before `offset`, never past the durable end nor (when an outbox
    /// forwards this log) past what was forwarded; the head only moves forward.
    fn trim(&self, topic: Topic, offset: u64) -> Result<u64> {
        let mut offset = offset.min(*self.topic(topic).durable.borrow());
        if let Some(c) = self
            .db
            .get(key(CURSOR, topic, &[]))
            .map_err(|e| self.store(e))?
        {
            offset = offset.min(offset_of(&c).unwrap_or(0));
        }
        let head = self
            .db
            .get(key(HEAD, topic, &[]))
            .map_err(|e| self.store(e))?;
        let offset = offset.max(head.and_then(|h| offset_of(&h)).unwrap_or(0));
        let range = key(RECORD, topic, &[])..key(RECORD, topic, &offset.to_be_bytes());
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.db.range(range) {
            let (k, v) = item.map_err(|e| self.store(e))?;
            match serde_json::from_slice::<Stored>(&v) {
                Ok(s) => batch.remove(key(ID, topic, s.envelope.dedup_key().as_bytes())),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), %topic, error = %e, "trimming an undecodable record; its id entry stays")
                }
            }
            batch.remove(k);
            n += 1;
        }
        batch.insert(key(HEAD, topic, &[]), &offset.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.store(e))?;
        Ok(n)
    }
}

#[async_trait]
impl EventStream for SledLog {
    #[tracing::instrument(level = "debug", skip(self, envelope), fields(backend = "sled", id = %envelope.id))]
    async fn publish(&self, topic: Topic, key: &str, envelope: &Envelope) -> Result<Receipt> {
        let value = self.encode(topic, key, envelope)?;
        let receipt = self
            .publish_now(topic, vec![(envelope, value)])?
            .pop()
            .ok_or_else(|| Error::Corrupt {
                path: self.inner.path.clone(),
                detail: "no receipt for a published event".into(),
            })?;
        // A duplicate is acknowledged only once its first copy is durable too.
        self.flush().await?;
        self.made_durable(topic, receipt.offset + 1);
        metrics::counter!(
            "soma_adapters_events_published_total",
            "backend" => "sled",
            "topic" => topic.name(),
            "duplicate" => if receipt.duplicate { "true" } else { "false" }
        )
        .increment(1);
        Ok(receipt)
    }

    async fn publish_batch(
        &self,
        topic: Topic,
        events: &[(String, Envelope)],
    ) -> Result<Vec<Receipt>> {
        // Every event is checked before any is written: a bad one stores none of the batch.
        let values = events
            .iter()
            .map(|(k, e)| self.encode(topic, k, e))
            .collect::<Result<Vec<_>>>()?;
        let receipts =
            self.publish_now(topic, events.iter().map(|(_, e)| e).zip(values).collect())?;
        self.flush().await?;
        if let Some(end) = receipts.iter().map(|r| r.offset + 1).max() {
            self.made_durable(topic, end);
        }
        metrics::counter!(
            "soma_adapters_events_published_total",
            "backend" => "sled",
            "topic" => topic.name(),
            "duplicate" => "false"
        )
        .increment(receipts.iter().filter(|r| !r.duplicate).count() as u64);
        Ok(receipts)
    }

    async fn partitions(&self, _topic: Topic) -> Result<u32> {
        Ok(1)
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>> {
        if partition != 0 {
            return Err(Error::Invalid {
                what: "partition",
                value: partition.to_string(),
                reason: "the embedded log has one partition per topic (0)",
            });
        }
        self.read_waiting(topic, from, max, wait).await
    }

    async fn consumer(&self, group: &str, topic: Topic) -> Result<Box<dyn GroupConsumer>> {
        check_group(group)?;
        let inner = &self.inner;
        let gkey = key(GROUP, topic, group.as_bytes());
        let committed = inner.db.get(&gkey).map_err(|e| inner.store(e))?;
        let position = committed.and_then(|v| offset_of(&v)).unwrap_or(0);
        Ok(Box::new(SledConsumer {
            log: self.clone(),
            topic,
            gkey,
            position,
        }))
    }
}

/// A consumer-group member of the embedded log (one member per group at a time).
#[derive(Debug)]
struct SledConsumer {
    log: SledLog,
    topic: Topic,
    gkey: Vec<u8>,
    position: u64,
}

#[async_trait]
impl GroupConsumer for SledConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        let records = self
            .log
            .read_waiting(self.topic, self.position, max, wait)
            .await?;
        if let Some(last) = records.last() {
            self.position = last.offset + 1;
        }
        Ok(records)
    }

    async fn commit(&mut self, records: &[Record]) -> Result<()> {
        let Some(next) = records
            .iter()
            .filter(|r| r.topic == self.topic)
            .map(|r| r.offset + 1)
            .max()
        else {
            return Ok(());
        };
        let inner = &self.log.inner;
        inner
            .db
            .update_and_fetch(&self.gkey, |old| {
                let old = old.and_then(offset_of).unwrap_or(0);
                Some(old.max(next).to_be_bytes().to_vec())
            })
            .map_err(|e| inner.store(e))?;
        self.log.flush().await
    }
}
