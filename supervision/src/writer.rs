//! Group commit: one task gathers the appends of all senders into batches and appends each
//! batch with one journal call (one flush), then answers each sender with its sequence
//! number. It only writes: delivering to actors is the sender's business.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{Error, Fence, Result};
use crate::journal::{Append, Journal, Seq};

/// What to do with an answer nobody waits for any more (the sender was cancelled).
pub(crate) type Orphan = Box<dyn FnOnce(Result<Seq>) + Send>;

struct Request {
    append: Append,
    reply: oneshot::Sender<Result<Seq>>,
    orphan: Orphan,
}

impl Request {
    fn answer(self, result: Result<Seq>) {
        if let Err(result) = self.reply.send(result) {
            (self.orphan)(result);
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

/// Sends appends to the writer task.
#[derive(Clone, Debug)]
pub(crate) struct WriterHandle {
    tx: mpsc::UnboundedSender<Request>,
    stats: Arc<Counts>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
    stop: Arc<tokio::sync::Notify>,
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

impl WriterHandle {
    /// Starts the writer task; batches hold at most `max_batch` messages and about
    /// `max_batch_bytes` bytes.
    pub(crate) fn start(
        journal: Arc<dyn Journal>,
        max_batch: usize,
        max_batch_bytes: usize,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Counts::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run(
            journal,
            rx,
            max_batch.max(1),
            max_batch_bytes.max(1),
            stats.clone(),
            stop.clone(),
        ));
        Self {
            tx,
            stats,
            task: Arc::new(Mutex::new(Some(task))),
            stop,
        }
    }

    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            batches: self.stats.batches.load(Ordering::Relaxed),
            messages: self.stats.messages.load(Ordering::Relaxed),
        }
    }

    /// Appends one message; its sequence number once durable. If the caller stops waiting
    /// after the hand-over, `orphan` gets the answer instead.
    pub(crate) async fn append(&self, append: Append, orphan: Orphan) -> Result<Seq> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Request {
                append,
                reply,
                orphan,
            })
            .is_err()
        {
            return Err(Error::Stopped {
                what: "journal writer",
            });
        }
        // Handed over: the append may reach the disk even if the answer is lost.
        rx.await.map_err(|_| Error::OutcomeUnknown {
            what: "journal writer",
        })?
    }

    /// Ends the writer: what it already took is appended and answered; what is still queued
    /// is answered `Stopped` (never appended).
    pub(crate) async fn shutdown(&self) {
        self.stop.notify_one();
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(
    journal: Arc<dyn Journal>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    max_batch: usize,
    max_batch_bytes: usize,
    stats: Arc<Counts>,
    stop: Arc<tokio::sync::Notify>,
) {
    let batch_size = crate::metrics::batch_size();
    let mut requests: Vec<Request> = Vec::with_capacity(max_batch);
    let mut held: Option<Request> = None;
    loop {
        if let Some(r) = held.take() {
            requests.push(r);
        }
        if requests.is_empty() {
            tokio::select! {
                biased;
                () = stop.notified() => break,
                got = rx.recv() => match got {
                    Some(r) => requests.push(r),
                    None => break,
                },
            }
        }
        // Everything waiting joins the batch, up to its count and byte budget.
        let mut bytes: usize = requests.iter().map(|r| r.append.payload.len()).sum();
        while requests.len() < max_batch && bytes < max_batch_bytes {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.append.payload.len();
                    if bytes > max_batch_bytes && !requests.is_empty() {
                        held = Some(r);
                        break;
                    }
                    requests.push(r);
                }
                Err(_) => break,
            }
        }
        batch_size.record(requests.len() as f64);
        write(&*journal, &mut requests, &stats).await;
    }
    rx.close();
    while let Ok(r) = rx.try_recv() {
        r.answer(Err(Error::Stopped {
            what: "journal writer",
        }));
    }
    if let Some(r) = held {
        r.answer(Err(Error::Stopped {
            what: "journal writer",
        }));
    }
}

/// Appends `requests` and answers them. A batch refused for one range's stale epoch is
/// appended again without that range's messages (refused as not owned): one range's loss
/// never fails the others.
async fn write(journal: &dyn Journal, requests: &mut Vec<Request>, stats: &Counts) {
    let mut appends: Vec<Append> = Vec::with_capacity(requests.len());
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
                for (r, seq) in requests.drain(..).zip(seqs) {
                    r.answer(Ok(seq));
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
                    let key = r.append.key.to_string();
                    r.answer(Err(Error::NotOwned { key, range }));
                }
                *requests = rest;
            }
            Err(e) => {
                tracing::error!(error = %e, messages = requests.len(), "journal append failed");
                // One refused message (too large, a bad key) must not fail its neighbours:
                // such errors are answered alone.
                if requests.len() > 1 && !matches!(e, Error::Storage { .. }) {
                    let single: Vec<Request> = std::mem::take(requests);
                    for r in single {
                        let mut one = vec![r];
                        Box::pin(write(journal, &mut one, stats)).await;
                    }
                    return;
                }
                let single = requests.len() == 1
                    && matches!(e, Error::TooLarge { .. } | Error::InvalidKey { .. });
                if single {
                    if let Some(r) = requests.pop() {
                        r.answer(Err(e));
                    }
                    return;
                }
                let shared = Arc::new(e);
                for r in requests.drain(..) {
                    r.answer(Err(Error::Append {
                        source: shared.clone(),
                    }));
                }
            }
        }
    }
}
