//! The generator pool. On the native engine (the CPU default) it batches continuously: each
//! replica actor owns a scheduler thread that runs every active sequence's next step together,
//! fed from one queue shared by the pool and fair between tenants (see [`super::batch`]).
//! On candle (CUDA) each replica actor owns a copy of the model (shared weights, its own
//! key-value cache) and serves one generation at a time; requests go to the least-loaded
//! replica and queue in its mailbox.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, watch};

use super::batch::{BLOCK_TOKENS, BatchStats, EVENT_ROOM, Inbox, Limits, Scheduler, Seq};
use super::{InFlight, LoadGuard, PoolStats, ReplicaCtx, Replicas};
use crate::device::check_threads;
use crate::error::{Error, Result};
use crate::generate::{
    Completion, FinishReason, GenerateRequest, GenerationEvent, GenerationModel, Prepared,
};
use crate::metrics as m;

pub(crate) const POOL: &str = "generator";

/// Events buffered between a replica and a slow reader before the replica waits (candle) or
/// the sequence is paused (batching).
const STREAM_BUFFER: usize = 64;
const _: () = assert!(STREAM_BUFFER > EVENT_ROOM);

/// How the generator pool runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Replicas (actors). Native engine: batch schedulers sharing one set of compute threads
    /// (one is what a CPU needs); candle: each serves one generation at a time.
    pub replicas: usize,
    /// Native engine: sequences run together in one step.
    pub max_batch: usize,
    /// Native engine: memory for the key-value caches of running sequences and of kept
    /// prefixes, in MiB. A request whose prompt and `max_tokens` need more is refused.
    /// (The default holds several full contexts of the models in `models/`.)
    pub kv_cache_mib: usize,
    /// Native engine: prompt tokens run per step (chunked prefill), over all sequences.
    pub prefill_tokens: usize,
    /// Native engine: finished conversations whose cache is kept for their next turn.
    pub prefix_cache_entries: usize,
    /// Longest a request waits to start before it fails with a queue timeout, in ms.
    pub queue_timeout_ms: u64,
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
            max_batch: 16,
            kv_cache_mib: 512,
            prefill_tokens: 64,
            prefix_cache_entries: 32,
            queue_timeout_ms: 60_000,
            queue: 256,
            threads: None,
        }
    }
}

impl GeneratorConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        for (key, n) in [
            ("replicas", self.replicas),
            ("queue", self.queue),
            ("max_batch", self.max_batch),
            ("kv_cache_mib", self.kv_cache_mib),
            ("prefill_tokens", self.prefill_tokens),
            ("queue_timeout_ms", self.queue_timeout_ms as usize),
        ] {
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

pub(crate) fn record_usage(c: &Completion, first: Option<Instant>) {
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
    /// Batching: the sequence's paused flag and the scheduler's inbox, woken when this
    /// stream reads after a pause or goes away.
    wake: Option<(Arc<AtomicBool>, Arc<Inbox>)>,
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if let Some((_, inbox)) = &self.wake {
            // Closed first, so that the woken scheduler sees it and frees the sequence.
            self.rx.close();
            inbox.wake();
        }
    }
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
                if let Some((paused, inbox)) = &self.wake
                    && paused.swap(false, Ordering::SeqCst)
                {
                    inbox.wake();
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
    mode: Mode,
    queue: usize,
}

#[derive(Debug)]
enum Mode {
    /// Candle: one generation per replica at a time.
    Replicas(Replicas<Job>),
    /// Native: continuous batching.
    Batch(Batch),
}

struct Batch {
    replicas: Replicas<BatchMsg>,
    inbox: Arc<Inbox>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    stats: watch::Receiver<BatchStats>,
    kv_blocks: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("stats", &*self.stats.borrow())
            .finish_non_exhaustive()
    }
}

/// A batch replica takes no messages: requests reach its scheduler through the pool's
/// shared queue. The actor owns the scheduler's life (a kill or restart ends it).
pub(crate) enum BatchMsg {}

/// What a batch replica starts its scheduler with.
#[derive(Clone)]
struct BatchParts {
    inbox: Arc<Inbox>,
    weights: Arc<crate::native::Weights>,
    tokenizer: Arc<crate::gguf::TextTokenizer>,
    limits: Limits,
    stats: Arc<watch::Sender<BatchStats>>,
}

struct BatchReplica {
    parts: BatchParts,
    ctx: ReplicaCtx<BatchMsg>,
}

/// Ends the scheduler's incarnation when the actor's state goes (stop, kill or restart).
struct SchedulerGuard {
    inbox: Arc<Inbox>,
    slot: usize,
    incarnation: u64,
}

impl Drop for SchedulerGuard {
    fn drop(&mut self) {
        self.inbox.end(self.slot, self.incarnation);
    }
}

impl Actor for BatchReplica {
    type Msg = BatchMsg;
    type State = SchedulerGuard;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<BatchMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        let slot = self.ctx.index();
        let parts = self.parts.clone();
        let incarnation = parts.inbox.begin(slot);
        let scheduler = Scheduler {
            inbox: parts.inbox.clone(),
            slot,
            incarnation,
            weights: parts.weights,
            tokenizer: parts.tokenizer,
            compute: self.ctx.compute.clone(),
            limits: parts.limits,
            stats: parts.stats,
        };
        // The thread ends at its next step once the incarnation is over (it holds no lock
        // and nothing waits for it). If it panics outside a step (a bug), the actor is killed
        // so that the supervisor starts a new one, as for any crashed replica.
        let actor = myself.clone();
        std::thread::Builder::new()
            .name(format!("soma-batch-{slot}"))
            .spawn(move || {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.run()))
                    .is_err()
                {
                    tracing::error!(slot, "the batch scheduler panicked: restarting its replica");
                    actor.kill();
                }
            })
            .map_err(|e| format!("starting the batch scheduler: {e}"))?;
        self.ctx.started(myself);
        Ok(SchedulerGuard {
            inbox: self.parts.inbox.clone(),
            slot,
            incarnation,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<BatchMsg>,
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.ctx.slot.unregister(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<BatchMsg>,
        msg: BatchMsg,
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {}
    }
}

impl GeneratorPool {
    /// Starts `config.replicas` replicas sharing `model`'s weights: batch schedulers on the
    /// native engine, one-at-a-time replicas on candle.
    pub async fn start(model: GenerationModel, config: GeneratorConfig) -> Result<Self> {
        config.validate()?;
        let base = Arc::new(model);
        let mode = match base.native_weights() {
            Some(weights) => Mode::Batch(Self::start_batch(&base, weights, &config).await?),
            None => {
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
                Mode::Replicas(replicas)
            }
        };
        Ok(Self {
            base,
            mode,
            queue: config.queue,
        })
    }

    async fn start_batch(
        base: &GenerationModel,
        weights: Arc<crate::native::Weights>,
        config: &GeneratorConfig,
    ) -> Result<Batch> {
        let block_bytes = weights.cache_bytes_per_token() * BLOCK_TOKENS;
        // The budget is the pool's: each batch replica (one scheduler) gets an equal part.
        let kv_blocks = config.kv_cache_mib.saturating_mul(1 << 20)
            / block_bytes.max(1)
            / config.replicas.max(1);
        if kv_blocks == 0 {
            return Err(Error::Config(format!(
                "generator.kv_cache_mib: {} MiB over {} replica(s) holds no block of {BLOCK_TOKENS} tokens of this model's cache ({block_bytes} bytes) per replica",
                config.kv_cache_mib, config.replicas
            )));
        }
        if kv_blocks < base.context_length().div_ceil(BLOCK_TOKENS) {
            tracing::warn!(
                kv_cache_mib = config.kv_cache_mib,
                tokens = kv_blocks * BLOCK_TOKENS,
                context = base.context_length(),
                "the key-value cache holds less than one full context: longer requests are refused"
            );
        }
        let limits = Limits {
            max_batch: config.max_batch,
            kv_blocks,
            prefill_tokens: config.prefill_tokens,
            queue_timeout: Duration::from_millis(config.queue_timeout_ms),
            prefix_entries: config.prefix_cache_entries,
        };
        let (stats_tx, stats) = watch::channel(BatchStats {
            kv_blocks,
            ..BatchStats::default()
        });
        let parts = BatchParts {
            inbox: Arc::new(Inbox::default()),
            weights,
            tokenizer: base.tokenizer().clone(),
            limits,
            stats: Arc::new(stats_tx),
        };
        let inbox = parts.inbox.clone();
        let mut replicas = Replicas::new(POOL, config.replicas);
        replicas
            .start(move |ctx| {
                (
                    BatchReplica {
                        parts: parts.clone(),
                        ctx,
                    },
                    (),
                )
            })
            .await?;
        Ok(Batch {
            replicas,
            inbox,
            in_flight: Arc::default(),
            stats,
            kv_blocks,
        })
    }

    /// The model the replicas run.
    pub fn model(&self) -> &GenerationModel {
        &self.base
    }

    /// Checks the request, queues it and returns its stream.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationStream> {
        let tenant: Arc<str> = Arc::from(req.tenant.as_deref().unwrap_or(""));
        let prepared = self.base.prepare(req)?;
        let prompt_tokens = prepared.tokens.len();
        let replicas = match &self.mode {
            Mode::Batch(batch) => {
                // A request is queued only while a scheduler runs (or restarts within
                // REPLICA_WAIT): with none, nothing would ever take it or time it out.
                batch.replicas.wait_live().await?;
                return self.generate_batched(batch, prepared, tenant);
            }
            Mode::Replicas(r) => r,
        };
        if replicas.total_load() >= self.queue {
            metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => "queue_full").increment(1);
            return Err(Error::QueueFull(POOL));
        }
        let (actor, load) = replicas.pick().await?;
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
            wake: None,
        })
    }

    fn generate_batched(
        &self,
        batch: &Batch,
        prepared: Prepared,
        tenant: Arc<str>,
    ) -> Result<GenerationStream> {
        let need = prepared.tokens.len() + prepared.params.max_tokens + 1;
        if need.div_ceil(BLOCK_TOKENS) > batch.kv_blocks {
            return Err(Error::InvalidRequest(format!(
                "prompt ({} tokens) plus max_tokens ({}) needs more key-value cache than the pool holds ({} tokens, generator.kv_cache_mib)",
                prepared.tokens.len(),
                prepared.params.max_tokens,
                batch.kv_blocks * BLOCK_TOKENS
            )));
        }
        let Some(count) = InFlight::try_new(&batch.in_flight, self.queue) else {
            metrics::counter!(m::REQUESTS, "pool" => POOL, "outcome" => "queue_full").increment(1);
            return Err(Error::QueueFull(POOL));
        };
        let prompt_tokens = prepared.tokens.len();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let paused = Arc::new(AtomicBool::new(false));
        batch
            .inbox
            .push(Seq::new(prepared, tenant, tx, paused.clone(), count));
        Ok(GenerationStream {
            rx,
            finished: false,
            prompt_tokens,
            wake: Some((paused, batch.inbox.clone())),
        })
    }

    /// Generates to the end and returns the completion.
    pub async fn complete(&self, req: GenerateRequest) -> Result<Completion> {
        self.generate(req).await?.complete().await
    }

    fn replicas_stats(&self) -> PoolStats {
        match &self.mode {
            Mode::Replicas(r) => r.stats(),
            Mode::Batch(b) => {
                let mut stats = b.replicas.stats();
                // One shared queue: everything accepted and not finished.
                stats.in_flight = vec![b.in_flight.load(Ordering::Acquire)];
                stats
            }
        }
    }

    /// Replicas, their load and starts. With batching, `in_flight` has one entry: the
    /// requests accepted and not finished across the pool.
    pub fn stats(&self) -> PoolStats {
        self.replicas_stats()
    }

    /// The batch scheduler's figures, updated after every step (native engine only).
    pub fn batch_stats(&self) -> Option<watch::Receiver<BatchStats>> {
        match &self.mode {
            Mode::Batch(b) => Some(b.stats.clone()),
            Mode::Replicas(_) => None,
        }
    }

    /// Kills replica `i` as a crash would; its requests fail, the supervisor restarts it.
    pub fn kill_replica(&self, i: usize) -> Result<()> {
        match &self.mode {
            Mode::Replicas(r) => r.kill(i),
            Mode::Batch(b) => b.replicas.kill(i),
        }
    }

    /// Waits until every replica runs (after a kill), up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        match &self.mode {
            Mode::Replicas(r) => r.wait_all_live(timeout).await,
            Mode::Batch(b) => b.replicas.wait_all_live(timeout).await,
        }
    }
}
