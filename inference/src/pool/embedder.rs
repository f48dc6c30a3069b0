//! The embedder pool: a batcher collects requests for up to `max_wait` or `max_batch` texts
//! while every replica is busy, then hands the batch to the least-loaded replica actor,
//! which runs one forward pass and answers each request with its own vectors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{LoadGuard, PoolStats, ReplicaCtx, Replicas};
use crate::device::check_threads;
use crate::embed::EmbeddingModel;
use crate::error::{Error, Result};
use crate::metrics as m;

const POOL: &str = "embedder";

/// How the embedder pool runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedderConfig {
    /// Replicas (actors) serving batches; each runs one batch at a time.
    pub replicas: usize,
    /// Most texts in one forward pass (a request's texts are never split).
    pub max_batch: usize,
    /// Longest a request waits for others to batch with, once a replica is free (in
    /// configuration files: milliseconds, `max_wait_ms`).
    #[serde(rename = "max_wait_ms", with = "crate::device::millis")]
    pub max_wait: Duration,
    /// Most requests waiting; more are refused with [`Error::QueueFull`].
    pub queue: usize,
    /// Most texts in one request.
    pub max_texts: usize,
    /// CPU threads expected (see [`crate::cpu_threads`]); `None` takes what is in effect.
    pub threads: Option<usize>,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue: 1024,
            max_texts: 256,
            threads: None,
        }
    }
}

impl EmbedderConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        for (key, n) in [
            ("replicas", self.replicas),
            ("max_batch", self.max_batch),
            ("queue", self.queue),
            ("max_texts", self.max_texts),
        ] {
            if n == 0 {
                return Err(Error::Config(format!("embedder.{key}: must be at least 1")));
            }
        }
        check_threads(self.threads).map_err(|e| Error::Config(format!("embedder.threads: {e}")))
    }
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
    accepted: Instant,
}

/// A batch on its way to a replica; the permit and the load guard are released when it is
/// answered or dropped.
pub(crate) struct Batch {
    jobs: Vec<Job>,
    _permit: OwnedSemaphorePermit,
    _load: LoadGuard<Batch>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

struct Replica {
    model: Arc<EmbeddingModel>,
    ctx: ReplicaCtx<Batch>,
}

impl Actor for Replica {
    type Msg = Batch;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<Batch>, _: ()) -> Result<(), ActorProcessingErr> {
        self.ctx.started(myself);
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Batch>,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        self.ctx.slot.unregister(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Batch>,
        batch: Batch,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let texts: Vec<String> = batch.jobs.iter().flat_map(|j| j.texts.clone()).collect();
        let size = texts.len();
        metrics::histogram!(m::BATCH_SIZE).record(size as f64);
        let span = tracing::debug_span!(
            "inference.embed_batch",
            replica = self.ctx.index(),
            size,
            requests = batch.jobs.len()
        );
        let _enter = span.enter();
        let model = self.model.clone();
        let compute = self.ctx.compute.clone();
        let result = tokio::task::spawn_blocking(move || compute.install(|| model.embed(&texts)))
            .await
            .map_err(|e| format!("embedding replica {} panicked: {e}", self.ctx.index()))?;
        match result {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for job in batch.jobs {
                    let mine: Vec<Vec<f32>> = vectors.by_ref().take(job.texts.len()).collect();
                    finish(job.accepted, "ok");
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                tracing::warn!(replica = self.ctx.index(), error = %e, "embedding batch failed");
                for job in batch.jobs {
                    finish(job.accepted, "error");
                    let _ = job.reply.send(Err(Error::Compute(e.to_string())));
                }
            }
        }
        Ok(())
    }
}

fn finish(accepted: Instant, outcome: &'static str) {
    metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => outcome).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "pool" => POOL)
        .record(accepted.elapsed().as_secs_f64());
}

/// A pool of embedding replicas behind a dynamic batcher.
#[derive(Debug)]
pub struct EmbedderPool {
    tx: mpsc::Sender<Job>,
    replicas: Arc<Replicas<Batch>>,
    dimension: usize,
    max_texts: usize,
    model: Arc<EmbeddingModel>,
    batcher: tokio::task::JoinHandle<()>,
}

impl EmbedderPool {
    /// Starts `config.replicas` replicas sharing `model`'s weights, and the batcher.
    pub async fn start(model: EmbeddingModel, config: EmbedderConfig) -> Result<Self> {
        config.validate()?;
        let dimension = model.dimension();
        let model = Arc::new(model);
        let shared = model.clone();
        let mut replicas = Replicas::new(POOL, config.replicas);
        replicas
            .start(move |ctx| {
                (
                    Replica {
                        model: model.clone(),
                        ctx,
                    },
                    (),
                )
            })
            .await?;
        let replicas = Arc::new(replicas);
        let (tx, rx) = mpsc::channel(config.queue);
        let batcher = tokio::spawn(batcher(rx, replicas.clone(), config.clone()));
        Ok(Self {
            tx,
            replicas,
            dimension,
            max_texts: config.max_texts,
            model: shared,
            batcher,
        })
    }

    /// The model the replicas run (for its tokenizer: token counts of inputs).
    pub fn model(&self) -> &EmbeddingModel {
        &self.model
    }

    /// Most texts in one request.
    pub fn max_texts(&self) -> usize {
        self.max_texts
    }

    /// Length of the vectors.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The vector of one text.
    pub async fn embed(&self, text: impl Into<String>) -> Result<Vec<f32>> {
        let mut v = self.embed_many(vec![text.into()]).await?;
        v.pop()
            .ok_or_else(|| Error::Compute("no vector returned".into()))
    }

    /// One vector per text, in order.
    pub async fn embed_many(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Err(Error::InvalidRequest("no texts to embed".into()));
        }
        if texts.len() > self.max_texts {
            return Err(Error::InvalidRequest(format!(
                "{} texts in one request; at most {}",
                texts.len(),
                self.max_texts
            )));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            texts,
            reply,
            accepted: Instant::now(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::QueueFull(POOL),
            mpsc::error::TrySendError::Closed(_) => Error::Unavailable(POOL),
        })?;
        metrics::gauge!(m::QUEUE_DEPTH, "pool" => POOL).increment(1.0);
        match rx.await {
            Ok(r) => r,
            Err(_) => {
                metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => "replica_failed")
                    .increment(1);
                Err(Error::ReplicaFailed { pool: POOL })
            }
        }
    }

    /// Replicas, their load and starts.
    pub fn stats(&self) -> PoolStats {
        self.replicas.stats()
    }

    /// Kills replica `i` as a crash would; its batch fails, the supervisor restarts it.
    pub fn kill_replica(&self, i: usize) -> Result<()> {
        self.replicas.kill(i)
    }

    /// Waits until every replica runs (after a kill), up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.replicas.wait_all_live(timeout).await
    }
}

impl Drop for EmbedderPool {
    fn drop(&mut self) {
        self.batcher.abort();
    }
}

async fn batcher(
    mut rx: mpsc::Receiver<Job>,
    replicas: Arc<Replicas<Batch>>,
    config: EmbedderConfig,
) {
    let free = Arc::new(Semaphore::new(config.replicas));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = free.clone().acquire_owned().await else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(first.accepted + config.max_wait);
        let mut size = first.texts.len();
        let mut jobs = vec![first];
        while size < config.max_batch {
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(job) = next else { break };
            size += job.texts.len();
            jobs.push(job);
        }
        metrics::gauge!(m::QUEUE_DEPTH, "pool" => POOL).decrement(jobs.len() as f64);
        match replicas.pick().await {
            Ok((actor, load)) => {
                let batch = Batch {
                    jobs,
                    _permit: permit,
                    _load: load,
                };
                if let Err(e) = actor.cast(batch) {
                    // The replica died between the pick and the cast: its batch is dropped
                    // with the message, and each caller gets ReplicaFailed.
                    tracing::warn!(pool = POOL, error = %e, "replica gone before its batch");
                }
            }
            Err(e) => {
                for job in jobs {
                    finish(job.accepted, "error");
                    let _ = job.reply.send(Err(Error::Unavailable(POOL)));
                }
                tracing::warn!(pool = POOL, error = %e, "no replica for a batch");
            }
        }
    }
}
