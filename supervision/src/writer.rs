//! Group commit: one task gathers the appends of all senders into batches, appends each batch
//! with one journal call (one flush), then acknowledges the senders and delivers to actors in
//! sequence order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Fence, Result};
use crate::journal::{Append, Journal, Seq};
use crate::slot::Slot;

struct Request {
    append: Append,
    slot: Arc<Slot>,
    reply: oneshot::Sender<Result<Seq>>,
}

/// Sends appends to the writer task.
#[derive(Clone, Debug)]
pub(crate) struct WriterHandle {
    tx: mpsc::UnboundedSender<Request>,
    stats: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    batches: AtomicU64,
    messages: AtomicU64,
}

/// Group-commit counters since the runtime started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Journal appends (each one flush in flush-per-batch mode).
    pub batches: u64,
    /// Messages appended.
    pub messages: u64,
}

impl WriterStats {
    /// Messages per batch on average.
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.messages as f64 / self.batches as f64
        }
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("key", &self.append.key)
            .finish()
    }
}

impl WriterHandle {
    /// Starts the writer task; batches hold at most `max_batch` messages.
    pub(crate) fn start(journal: Arc<dyn Journal>, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Counts::default());
        tokio::spawn(run(journal, rx, max_batch.max(1), stats.clone()));
        Self { tx, stats }
    }

    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            batches: self.stats.batches.load(Ordering::Relaxed),
            messages: self.stats.messages.load(Ordering::Relaxed),
        }
    }

    /// Appends one message (reserved on `slot`), durable on return.
    pub(crate) async fn append(&self, append: Append, slot: Arc<Slot>) -> Result<Seq> {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            append,
            slot: slot.clone(),
            reply,
        };
        if self.tx.send(request).is_err() {
            slot.unreserve();
            return Err(Error::Stopped {
                what: "journal writer",
            });
        }
        // Handed over: the append may have reached the disk even if the answer is lost.
        rx.await.map_err(|_| Error::OutcomeUnknown {
            what: "journal writer",
        })?
    }
}

async fn run(
    journal: Arc<dyn Journal>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    max_batch: usize,
    stats: Arc<Counts>,
) {
    let batch_size = crate::metrics::batch_size();
    let mut requests: Vec<Request> = Vec::with_capacity(max_batch);
    let mut appends: Vec<Append> = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut requests, max_batch).await == 0 {
            return;
        }
        batch_size.record(requests.len() as f64);
        // A batch refused for one range's stale epoch is appended again without that
        // range's messages (they are refused): one owner's loss never fails the others.
        while !requests.is_empty() {
            appends.clear();
            appends.extend(requests.iter().map(|r| r.append.clone()));
            let started = std::time::Instant::now();
            let appended = journal.append(&appends).await;
            tracing::debug!(
                messages = appends.len(),
                took_us = started.elapsed().as_micros() as u64,
                "batch appended"
            );
            match appended {
                Ok(seqs) => {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats
                        .messages
                        .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                    // In sequence order: each actor's mailbox receives its messages in order.
                    for (r, seq) in requests.drain(..).zip(seqs) {
                        r.slot.appended(seq, r.append.payload);
                        let _ = r.reply.send(Ok(seq));
                    }
                }
                Err(Error::Fenced {
                    reason: Fence::StaleEpoch { range, .. },
                    ..
                }) => {
                    let (refused, rest): (Vec<Request>, Vec<Request>) = requests
                        .drain(..)
                        .partition(|r| journal.range_of(&r.append.key) == range);
                    for r in refused {
                        r.slot.unreserve();
                        let _ = r.reply.send(Err(Error::NotOwned {
                            key: r.append.key.to_string(),
                            range,
                        }));
                    }
                    requests = rest;
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = requests.len(), "journal append failed");
                    let detail = e.to_string();
                    for r in requests.drain(..) {
                        r.slot.unreserve();
                        let _ = r.reply.send(Err(Error::Append {
                            detail: detail.clone(),
                        }));
                    }
                }
            }
        }
    }
}
