//! The generator pool: each replica actor owns a copy of the model (shared weights, its own
//! key-value cache) and serves one generation at a time, streaming tokens to the requester;
//! requests go to the least-loaded replica and queue in its mailbox.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use super::{LoadGuard, PoolStats, ReplicaCtx, Replicas};
use crate::device::check_threads;
use crate::error::{Error, Result};
use crate::generate::{
    Completion, FinishReason, GenerateRequest, GenerationEvent, GenerationModel, Prepared,
};
use crate::metrics as m;

const POOL: &str = "generator";

/// Events buffered between a replica and a slow reader before the replica waits.
const STREAM_BUFFER: usize = 64;

/// How the generator pool runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Replicas (actors), each serving one generation at a time.
    pub replicas: usize,
    /// Most requests accepted and not finished across the pool; more are refused with
    /// [`Error::QueueFull`].
    pub queue: usize,
    /// CPU threads expected (see [`crate::cpu_threads`]); `None` takes what is in effect.
    pub threads: Option<usize>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            queue: 256,
            threads: None,
        }
    }
}

impl GeneratorConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        for (key, n) in [("replicas", self.replicas), ("queue", self.queue)] {
            if n == 0 {
                return Err(Error::Config(format!(
                    "generator.{key}: must be at least 1"
                )));
            }
        }
        check_threads(self.threads).map_err(|e| Error::Config(format!("generator.threads: {e}")))
    }
}

type Events = mpsc::Sender<Result<GenerationEvent>>;

pub(crate) struct Job {
    prepared: Prepared,
    tx: Events,
    accepted: Instant,
    queued: Queued,
    _load: LoadGuard<Job>,
}

/// Counts a request in the queue-depth gauge until it starts or is dropped unserved.
struct Queued;

impl Queued {
    fn new() -> Self {
        metrics::gauge!(m::QUEUE_DEPTH, "pool" => POOL).increment(1.0);
        Queued
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        metrics::gauge!(m::QUEUE_DEPTH, "pool" => POOL).decrement(1.0);
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

struct Replica {
    base: Arc<GenerationModel>,
    ctx: ReplicaCtx<Job>,
}

/// Sets the flag when the handler future is dropped (the actor was killed mid-request), so
/// the blocking decode loop stops.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Actor for Replica {
    type Msg = Job;
    type State = Option<GenerationModel>;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<Job>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        self.ctx.started(myself);
        Ok(Some((*self.base).clone()))
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Job>,
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.ctx.slot.unregister(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Job>,
        job: Job,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Job {
            prepared,
            tx,
            accepted,
            queued,
            _load,
        } = job;
        drop(queued);
        if tx.is_closed() {
            metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => "cancelled").increment(1);
            return Ok(());
        }
        let mut model = state.take().unwrap_or_else(|| (*self.base).clone());
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(stop.clone());
        let replica = self.ctx.index();
        let events = tx.clone();
        let span = tracing::info_span!(
            "inference.generate",
            replica,
            prompt_tokens = prepared.tokens.len(),
            max_tokens = prepared.params.max_tokens,
            structured = prepared.schema.is_some()
        );
        let compute = self.ctx.compute.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let mut first: Option<Instant> = None;
            let result = compute.install(|| {
                model.run(&prepared, &stop, &mut |event| {
                    if first.is_none() {
                        first = Some(Instant::now());
                        metrics::histogram!(m::TTFT_SECONDS)
                            .record(accepted.elapsed().as_secs_f64());
                    }
                    events.blocking_send(Ok(event)).is_ok()
                })
            });
            (model, result, first)
        });
        let (model, result, first) = task
            .await
            .map_err(|e| format!("generation replica {replica} panicked: {e}"))?;
        *state = Some(model);
        let outcome = match &result {
            Ok(c) if c.finish == FinishReason::Cancelled => "cancelled",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => outcome).increment(1);
        metrics::histogram!(m::REQUEST_SECONDS, "pool" => POOL)
            .record(accepted.elapsed().as_secs_f64());
        match result {
            Ok(c) => {
                record_usage(&c, first);
                tracing::debug!(
                    replica,
                    finish = ?c.finish,
                    completion_tokens = c.usage.completion_tokens,
                    "generation finished"
                );
                let _ = tx.send(Ok(GenerationEvent::Done(c))).await;
            }
            Err(e) => {
                tracing::debug!(replica, error = %e, "generation failed");
                let _ = tx.send(Err(e)).await;
            }
        }
        Ok(())
    }
}

fn record_usage(c: &Completion, first: Option<Instant>) {
    metrics::counter!(m::TOKENS, "kind" => "prompt").increment(c.usage.prompt_tokens as u64);
    metrics::counter!(m::TOKENS, "kind" => "completion")
        .increment(c.usage.completion_tokens as u64);
    if let Some(first) = first {
        let secs = first.elapsed().as_secs_f64();
        if c.usage.completion_tokens > 1 && secs > 0.0 {
            metrics::histogram!(m::TOKENS_PER_SECOND)
                .record((c.usage.completion_tokens - 1) as f64 / secs);
        }
    }
}

/// The events of one generation: tokens as they come, then [`GenerationEvent::Done`].
/// Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerationStream {
    rx: mpsc::Receiver<Result<GenerationEvent>>,
    finished: bool,
    prompt_tokens: usize,
}

impl GenerationStream {
    /// Tokens of the prompt (known before the first token: what a cut stream has cost on
    /// top of the tokens it yielded).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<GenerationEvent>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Reads to the end and returns the completion.
    pub async fn complete(mut self) -> Result<Completion> {
        while let Some(event) = self.next().await {
            if let GenerationEvent::Done(c) = event? {
                return Ok(c);
            }
        }
        Err(Error::ReplicaFailed { pool: POOL })
    }
}

impl Stream for GenerationStream {
    type Item = Result<GenerationEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(event)) => {
                if matches!(event, Ok(GenerationEvent::Done(_)) | Err(_)) {
                    self.finished = true;
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                // The replica went away without finishing.
                self.finished = true;
                metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => "replica_failed")
                    .increment(1);
                Poll::Ready(Some(Err(Error::ReplicaFailed { pool: POOL })))
            }
        }
    }
}

/// A pool of generation replicas.
#[derive(Debug)]
pub struct GeneratorPool {
    base: Arc<GenerationModel>,
    replicas: Replicas<Job>,
    queue: usize,
}

impl GeneratorPool {
    /// Starts `config.replicas` replicas sharing `model`'s weights.
    pub async fn start(model: GenerationModel, config: GeneratorConfig) -> Result<Self> {
        config.validate()?;
        let base = Arc::new(model);
        let mut replicas = Replicas::new(POOL, config.replicas);
        let model = base.clone();
        replicas
            .start(move |ctx| {
                (
                    Replica {
                        base: model.clone(),
                        ctx,
                    },
                    (),
                )
            })
            .await?;
        Ok(Self {
            base,
            replicas,
            queue: config.queue,
        })
    }

    /// The model the replicas run.
    pub fn model(&self) -> &GenerationModel {
        &self.base
    }

    /// Checks the request, queues it on the least-loaded replica and returns its stream.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationStream> {
        let prepared = self.base.prepare(req)?;
        let prompt_tokens = prepared.tokens.len();
        if self.replicas.total_load() >= self.queue {
            metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => "queue_full").increment(1);
            return Err(Error::QueueFull(POOL));
        }
        let (actor, load) = self.replicas.pick().await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let job = Job {
            prepared,
            tx,
            accepted: Instant::now(),
            queued: Queued::new(),
            _load: load,
        };
        if actor.cast(job).is_err() {
            return Err(Error::ReplicaFailed { pool: POOL });
        }
        Ok(GenerationStream {
            rx,
            finished: false,
            prompt_tokens,
        })
    }

    /// Generates to the end and returns the completion.
    pub async fn complete(&self, req: GenerateRequest) -> Result<Completion> {
        self.generate(req).await?.complete().await
    }

    /// Replicas, their load and starts.
    pub fn stats(&self) -> PoolStats {
        self.replicas.stats()
    }

    /// Kills replica `i` as a crash would; its requests fail, the supervisor restarts it.
    pub fn kill_replica(&self, i: usize) -> Result<()> {
        self.replicas.kill(i)
    }

    /// Waits until every replica runs (after a kill), up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.replicas.wait_all_live(timeout).await
    }
}
