//! Continuous batching for the native engine: a scheduler thread runs one step at a time for
//! every active sequence together (one pass over the weights per step), admits new sequences
//! between steps from a queue shared by the pool and fair between tenants, and mixes chunks of
//! prompt (prefill) with the decoding of the others so a long prompt does not stall them.
//!
//! Memory: each sequence's key-value cache is counted in blocks of [`BLOCK_TOKENS`] positions
//! against a budget; a sequence is counted for every token it holds (prompt and output) from
//! its admission, so a prompt being prefilled in chunks is never preempted for its own growth.
//! When a decode step would pass the budget, cached prefixes of finished sequences go first,
//! then the most recently admitted sequence is preempted: its cache is dropped and it waits at
//! the front of its tenant's queue, to be recomputed (prompt and output so far) when memory is
//! free again. Its sampler and decoder keep their state, so its output is the same.
//!
//! Prefix cache: the cache of a finished (or cancelled) sequence is kept, up to a number of
//! entries and within the budget, keyed by its tokens; a new sequence whose tokens start with
//! the same tokens (the next turn of a conversation) takes it and runs only the rest.
//!
//! Readers: a sequence whose reader has not taken its events (fewer than [`EVENT_ROOM`] free
//! slots in its stream) is paused, not waited for: the others go on; the stream wakes the
//! scheduler when it reads. A closed stream (client gone) frees its sequence at the next step.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::generate::{Decoder, GenerationEvent, Prepared};
use crate::gguf::TextTokenizer;
use crate::metrics as m;
use crate::native::{Cache, Weights, Work, with_warm_pool};

/// Positions per block of key-value memory.
pub(crate) const BLOCK_TOKENS: usize = 16;

/// Free event slots a stream needs for its sequence to run a step: a token, the text held
/// back and the completion.
pub(crate) const EVENT_ROOM: usize = 3;

/// A prefix shorter than this is not worth taking over.
const MIN_PREFIX: usize = BLOCK_TOKENS;

fn blocks(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// How the scheduler runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Sequences per step.
    pub(crate) max_batch: usize,
    /// Blocks of key-value memory.
    pub(crate) kv_blocks: usize,
    /// Prompt tokens run per step, over all sequences being prefilled.
    pub(crate) prefill_tokens: usize,
    /// How long a request may wait for its first admission.
    pub(crate) queue_timeout: Duration,
    /// Finished sequences' caches kept for reuse.
    pub(crate) prefix_entries: usize,
}

/// What the scheduler reports after each step (for tests, `stats` and operators).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Sequences admitted (holding memory), paused ones included.
    pub running: usize,
    /// Sequences waiting for admission (new or preempted).
    pub waiting: usize,
    /// Running sequences whose reader is behind.
    pub paused: usize,
    /// Steps run.
    pub steps: u64,
    /// Most sequences run in one step so far.
    pub max_batch_seen: usize,
    /// Sequences preempted for memory so far.
    pub preemptions: u64,
    /// Prompt tokens not recomputed thanks to the prefix cache.
    pub prefix_tokens_reused: u64,
    /// Key-value blocks in use (running sequences and kept prefixes).
    pub kv_blocks_used: usize,
    /// Key-value blocks in the budget.
    pub kv_blocks: usize,
    /// Sequences finished (completed, failed or cancelled).
    pub finished: u64,
}

type Events = mpsc::Sender<Result<GenerationEvent>>;

/// One generation: what it was asked, where its events go, and its decoding so far.
pub(crate) struct Seq {
    prepared: Prepared,
    tenant: Arc<str>,
    out: Out,
    decoder: Decoder,
    /// Every token to hold in the cache: the prompt, then each token generated (the last
    /// one is run by the next step).
    tokens: Vec<u32>,
    cache: Option<Cache>,
    /// Order of (re)admission: the newest is preempted first.
    order: u64,
    admitted_once: bool,
    _count: crate::pool::InFlight,
}

impl Seq {
    pub(crate) fn new(
        prepared: Prepared,
        tenant: Arc<str>,
        tx: Events,
        paused: Arc<AtomicBool>,
        count: crate::pool::InFlight,
    ) -> Self {
        Self {
            decoder: Decoder::new(&prepared),
            tokens: prepared.tokens.clone(),
            prepared,
            out: Out {
                tx,
                paused,
                accepted: Instant::now(),
                first: None,
                last: None,
                tenant: tenant.clone(),
            },
            tenant,
            cache: None,
            order: 0,
            admitted_once: false,
            _count: count,
        }
    }

    /// Tokens still to run before the next logits.
    fn pending(&self) -> usize {
        self.tokens
            .len()
            .saturating_sub(self.cache.as_ref().map_or(0, Cache::len))
    }
}

/// The sending end of a sequence's stream, with its timing.
struct Out {
    tx: Events,
    paused: Arc<AtomicBool>,
    accepted: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tenant: Arc<str>,
}

impl Out {
    /// Sends an event; false if the reader is gone.
    fn send(&mut self, event: Result<GenerationEvent>) -> bool {
        if let Ok(GenerationEvent::Token { .. }) = &event {
            let now = Instant::now();
            match self.last {
                None => {
                    metrics::histogram!(m::TTFT_SECONDS)
                        .record(now.duration_since(self.accepted).as_secs_f64());
                    self.first = Some(now);
                }
                Some(last) => metrics::histogram!(m::INTER_TOKEN_SECONDS)
                    .record(now.duration_since(last).as_secs_f64()),
            }
            self.last = Some(now);
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            // Only this thread sends, and a step runs only with EVENT_ROOM free slots: a full
            // stream cannot happen; if it did, the reader is treated as gone.
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::error!(tenant = %self.tenant, "a generation stream was full when it had room: cancelling it");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the reader is behind: marks the sequence paused (its stream wakes the
    /// scheduler when it reads) and checks again, so a read in between is not missed.
    fn behind(&self) -> bool {
        if self.tx.capacity() >= EVENT_ROOM {
            return false;
        }
        // SeqCst on both sides (the reader swaps the flag after it read): a store then a
        // load on two locations may otherwise each miss the other's write.
        self.paused.swap(true, Ordering::SeqCst);
        if self.tx.capacity() >= EVENT_ROOM {
            self.paused.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// The queue shared by the pool's requests, its streams and its schedulers.
#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<Queue>,
    cv: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Waiting sequences per tenant, in order.
    tenants: BTreeMap<Arc<str>, VecDeque<Seq>>,
    /// The tenant admitted from last: the next admission starts after it.
    cursor: Option<Arc<str>>,
    waiting: usize,
    /// Bumped whenever something changed that a waiting scheduler should look at: each
    /// scheduler compares it with the value it read before it last looked (a flag that one
    /// scheduler clears would hide the change from the others).
    wakes: u64,
    /// Each scheduler slot's current incarnation: an older one stops.
    incarnations: Vec<u64>,
}

impl Queue {
    fn push(&mut self, seq: Seq, front: bool) {
        let q = self.tenants.entry(seq.tenant.clone()).or_default();
        if front {
            q.push_front(seq);
        } else {
            q.push_back(seq);
        }
        self.waiting += 1;
    }

    /// The next tenant after the cursor with a waiting sequence, round-robin.
    fn next_tenant(&self) -> Option<Arc<str>> {
        let after = self.cursor.as_ref().and_then(|c| {
            self.tenants
                .range::<str, _>((std::ops::Bound::Excluded(&**c), std::ops::Bound::Unbounded))
                .find(|(_, q)| !q.is_empty())
        });
        after
            .or_else(|| self.tenants.iter().find(|(_, q)| !q.is_empty()))
            .map(|(t, _)| t.clone())
    }

    fn front(&self) -> Option<&Seq> {
        let t = self.next_tenant()?;
        self.tenants.get(&t).and_then(VecDeque::front)
    }

    fn pop(&mut self) -> Option<Seq> {
        let t = self.next_tenant()?;
        let q = self.tenants.get_mut(&t)?;
        let seq = q.pop_front()?;
        if q.is_empty() {
            self.tenants.remove(&t);
        }
        self.cursor = Some(t);
        self.waiting -= 1;
        Some(seq)
    }

    /// Removes waiting sequences whose reader is gone, and fails those that waited longer
    /// than `timeout` without ever running.
    fn sweep(&mut self, timeout: Duration) -> usize {
        let mut gone = 0;
        let now = Instant::now();
        for q in self.tenants.values_mut() {
            q.retain_mut(|seq| {
                if seq.out.tx.is_closed() {
                    gone += 1;
                    metrics::counter!(m::REQUESTS, "pool" => super::generator::POOL, "outcome" => "cancelled").increment(1);
                    return false;
                }
                if !seq.admitted_once && now.duration_since(seq.out.accepted) >= timeout {
                    gone += 1;
                    metrics::counter!(m::REQUESTS, "pool" => super::generator::POOL, "outcome" => "queue_timeout").increment(1);
                    let _ = seq.out.tx.try_send(Err(Error::QueueTimeout(timeout)));
                    return false;
                }
                true
            });
        }
        self.tenants.retain(|_, q| !q.is_empty());
        self.waiting -= gone;
        gone
    }

    /// When the oldest never-admitted waiting sequence times out.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.tenants
            .values()
            .flatten()
            .filter(|s| !s.admitted_once)
            .map(|s| s.out.accepted + timeout)
            .min()
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a new sequence.
    pub(crate) fn push(&self, seq: Seq) {
        self.lock().push(seq, false);
        self.wake();
    }

    /// Wakes a scheduler waiting for something to do (a stream read or closed).
    pub(crate) fn wake(&self) {
        self.lock().wakes += 1;
        self.cv.notify_all();
    }

    /// Sequences waiting for admission.
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Starts a new incarnation of scheduler `slot`; the previous one stops at its next
    /// step.
    pub(crate) fn begin(&self, slot: usize) -> u64 {
        let mut q = self.lock();
        if q.incarnations.len() <= slot {
            q.incarnations.resize(slot + 1, 0);
        }
        q.incarnations[slot] += 1;
        let n = q.incarnations[slot];
        drop(q);
        self.cv.notify_all();
        n
    }

    /// Stops incarnation `n` of scheduler `slot` (if it is still the current one).
    pub(crate) fn end(&self, slot: usize, n: u64) {
        let mut q = self.lock();
        if q.incarnations.get(slot) == Some(&n) {
            q.incarnations[slot] += 1;
        }
        drop(q);
        self.cv.notify_all();
    }
}

/// One scheduler: its slot and incarnation in the inbox, and what it runs.
pub(crate) struct Scheduler {
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) slot: usize,
    pub(crate) incarnation: u64,
    pub(crate) weights: Arc<Weights>,
    pub(crate) tokenizer: Arc<TextTokenizer>,
    pub(crate) compute: Arc<rayon::ThreadPool>,
    pub(crate) limits: Limits,
    pub(crate) stats: Arc<watch::Sender<BatchStats>>,
}

/// A finished sequence's cache, kept for a later sequence with the same start.
struct Prefix {
    tokens: Vec<u32>,
    cache: Cache,
    used: u64,
}

/// What one scheduler holds between steps.
#[derive(Default)]
struct Running {
    /// The inbox's wake count when this scheduler last looked (see `Queue::wakes`).
    wakes_seen: u64,
    seqs: Vec<Seq>,
    prefixes: Vec<Prefix>,
    admissions: u64,
    stats: BatchStats,
}

impl Running {
    fn blocks_used(&self) -> usize {
        let kept: usize = self.prefixes.iter().map(|p| blocks(p.cache.len())).sum();
        self.seq_blocks() + kept
    }

    /// Blocks of the running sequences (what evicting prefixes cannot free).
    fn seq_blocks(&self) -> usize {
        self.seqs.iter().map(|s| blocks(s.tokens.len())).sum()
    }

    /// Drops the least recently used kept prefix; false if none is left.
    fn evict_prefix(&mut self) -> bool {
        let Some(at) = (0..self.prefixes.len()).min_by_key(|&i| self.prefixes[i].used) else {
            return false;
        };
        self.prefixes.swap_remove(at);
        true
    }

    /// Takes the kept prefix sharing the longest start with `tokens`, cut to what is
    /// shared (and short of the last token, which must run to give logits).
    fn take_prefix(&mut self, tokens: &[u32], kv_dim: usize) -> Option<Cache> {
        let common = |p: &Prefix| {
            p.tokens
                .iter()
                .zip(tokens)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let (at, n) = self
            .prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| (i, common(p)))
            .max_by_key(|(_, n)| *n)?;
        if n < MIN_PREFIX {
            return None;
        }
        let mut cache = self.prefixes.swap_remove(at).cache;
        cache.truncate(n.min(tokens.len() - 1), kv_dim);
        Some(cache)
    }

    fn keep_prefix(&mut self, tokens: &[u32], cache: Cache, limits: &Limits) {
        if limits.prefix_entries == 0 || cache.len() < MIN_PREFIX {
            return;
        }
        let tokens = tokens[..cache.len().min(tokens.len())].to_vec();
        // One entry per start: a longer one replaces what it contains.
        self.prefixes.retain(|p| !tokens.starts_with(&p.tokens));
        while self.prefixes.len() >= limits.prefix_entries && self.evict_prefix() {}
        self.admissions += 1;
        self.prefixes.push(Prefix {
            tokens,
            cache,
            used: self.admissions,
        });
    }
}

impl Scheduler {
    /// Runs until its incarnation ends (the replica actor stopped or was killed); what it
    /// was running then fails (the streams end with `ReplicaFailed`).
    pub(crate) fn run(self) {
        let mut running = Running::default();
        running.stats.kv_blocks = self.limits.kv_blocks;
        let mut work = Work::default();
        let span = tracing::info_span!("inference.batch_scheduler", slot = self.slot);
        let _enter = span.enter();
        tracing::info!(
            slot = self.slot,
            max_batch = self.limits.max_batch,
            kv_blocks = self.limits.kv_blocks,
            "batch scheduler started"
        );
        while self.admit(&mut running) {
            let plan = self.plan(&mut running);
            if plan.is_empty() {
                if !self.wait(&running) {
                    break;
                }
                continue;
            }
            self.step(&mut running, &mut work, &plan);
        }
        tracing::info!(
            slot = self.slot,
            running = running.seqs.len(),
            "batch scheduler stopped"
        );
    }

    fn current(&self, q: &Queue) -> bool {
        q.incarnations.get(self.slot) == Some(&self.incarnation)
    }

    /// Frees sequences whose reader is gone, then admits waiting ones while the batch and
    /// the memory allow. False when this incarnation is over.
    fn admit(&self, running: &mut Running) -> bool {
        let kv_dim = self.weights.kv_dim();
        // Read the wake count before looking at the streams: a stream closed or read after
        // this look bumps it, and `wait` returns.
        running.wakes_seen = self.inbox.lock().wakes;
        running.seqs.retain_mut(|seq| {
            if !seq.out.tx.is_closed() {
                return true;
            }
            metrics::counter!(m::REQUESTS, "pool" => super::generator::POOL, "outcome" => "cancelled").increment(1);
            running.stats.finished += 1;
            false
        });
        let mut q = self.inbox.lock();
        if !self.current(&q) {
            return false;
        }
        running.stats.finished += q.sweep(self.limits.queue_timeout) as u64;
        while running.seqs.len() < self.limits.max_batch {
            let Some(front) = q.front() else { break };
            let need = blocks(front.tokens.len() + 1);
            while running.blocks_used() + need > self.limits.kv_blocks && running.evict_prefix() {}
            if running.blocks_used() + need > self.limits.kv_blocks && !running.seqs.is_empty() {
                break;
            }
            let Some(mut seq) = q.pop() else { break };
            if !seq.admitted_once {
                metrics::histogram!(m::QUEUE_WAIT_SECONDS)
                    .record(seq.out.accepted.elapsed().as_secs_f64());
                seq.admitted_once = true;
            }
            let cache = match running.take_prefix(&seq.tokens, kv_dim) {
                Some(cache) => {
                    running.stats.prefix_tokens_reused += cache.len() as u64;
                    metrics::counter!(m::PREFIX_TOKENS).increment(cache.len() as u64);
                    cache
                }
                None => self.weights.cache(),
            };
            seq.cache = Some(cache);
            running.admissions += 1;
            seq.order = running.admissions;
            running.seqs.push(seq);
        }
        running.stats.waiting = q.waiting;
        true
    }

    /// How many tokens each running sequence runs this step (index, tokens), making room
    /// in memory for the decoders' growth (evicting prefixes, then preempting).
    fn plan(&self, running: &mut Running) -> Vec<(usize, usize)> {
        loop {
            let mut plan = Vec::new();
            let mut prefill = self.limits.prefill_tokens;
            let mut paused = 0;
            let mut growth = 0;
            for (i, seq) in running.seqs.iter().enumerate() {
                let pending = seq.pending();
                if pending == 0 {
                    continue;
                }
                let take = if pending == 1 {
                    1
                } else {
                    pending.min(prefill)
                };
                if take == 0 {
                    continue;
                }
                // Decoding (one token) or the last chunk of a prompt: it will emit.
                if take == pending && seq.out.behind() {
                    paused += 1;
                    continue;
                }
                if pending > 1 {
                    prefill -= take;
                }
                if take == pending {
                    growth += blocks(seq.tokens.len() + 1) - blocks(seq.tokens.len());
                }
                plan.push((i, take));
            }
            running.stats.paused = paused;
            if running.blocks_used() + growth <= self.limits.kv_blocks {
                return plan;
            }
            if running.evict_prefix() {
                continue;
            }
            if running.seqs.len() <= 1 {
                return plan;
            }
            self.preempt(running);
        }
    }

    /// Sends the most recently admitted sequence back to the front of its queue, without
    /// its cache.
    fn preempt(&self, running: &mut Running) {
        let Some(at) = (0..running.seqs.len()).max_by_key(|&i| running.seqs[i].order) else {
            return;
        };
        let mut seq = running.seqs.swap_remove(at);
        seq.cache = None;
        running.stats.preemptions += 1;
        metrics::counter!(m::PREEMPTIONS).increment(1);
        tracing::debug!(tenant = %seq.tenant, tokens = seq.tokens.len(), "preempting a sequence for memory");
        self.inbox.lock().push(seq, true);
    }

    /// Waits for something to do: a new request, a reader that caught up or left, the next
    /// queue deadline. False when this incarnation is over.
    fn wait(&self, running: &Running) -> bool {
        let mut q = self.inbox.lock();
        loop {
            if !self.current(&q) {
                return false;
            }
            // Something waiting that `admit` would take now.
            let admissible = running.seqs.len() < self.limits.max_batch
                && q.front().is_some_and(|f| {
                    running.seqs.is_empty()
                        || running.seq_blocks() + blocks(f.tokens.len() + 1)
                            <= self.limits.kv_blocks
                });
            if q.wakes != running.wakes_seen || admissible {
                return true;
            }
            self.publish(running, q.waiting);
            q = match q.deadline(self.limits.queue_timeout) {
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return true;
                    }
                    self.inbox
                        .cv
                        .wait_timeout(q, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.inbox.cv.wait(q).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    fn publish(&self, running: &Running, waiting: usize) {
        let mut stats = running.stats.clone();
        stats.running = running.seqs.len();
        stats.waiting = waiting;
        stats.kv_blocks_used = running.blocks_used();
        metrics::gauge!(m::KV_BLOCKS).set(stats.kv_blocks_used as f64);
        metrics::gauge!(m::QUEUE_DEPTH, "pool" => super::generator::POOL).set(waiting as f64);
        self.stats.send_if_modified(|old| {
            let changed = *old != stats;
            *old = stats;
            changed
        });
    }

    /// Runs one step of `plan` and hands each sequence that reached its logits to its
    /// decoder.
    fn step(&self, running: &mut Running, work: &mut Work, plan: &[(usize, usize)]) {
        let span = tracing::debug_span!(
            "inference.batch_step",
            sequences = plan.len(),
            tokens = plan.iter().map(|(_, n)| n).sum::<usize>()
        );
        let _enter = span.enter();
        metrics::histogram!(m::BATCH_SEQUENCES).record(plan.len() as f64);
        running.stats.steps += 1;
        running.stats.max_batch_seen = running.stats.max_batch_seen.max(plan.len());
        let result = {
            let mut caches: Vec<Option<Cache>> =
                running.seqs.iter_mut().map(|s| s.cache.take()).collect();
            let mut inputs: Vec<(&mut Cache, &[u32])> = Vec::with_capacity(plan.len());
            let mut order = Vec::with_capacity(plan.len());
            for (slot, cache) in caches.iter_mut().enumerate() {
                let Some(&(_, take)) = plan.iter().find(|(i, _)| *i == slot) else {
                    continue;
                };
                let Some(cache) = cache.as_mut() else {
                    continue;
                };
                let seq = &running.seqs[slot];
                let from = cache.len();
                inputs.push((cache, &seq.tokens[from..from + take]));
                order.push(slot);
            }
            let weights = &self.weights;
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.compute
                    .install(|| with_warm_pool(|| weights.step(work, &mut inputs)))
            }));
            drop(inputs);
            for (seq, cache) in running.seqs.iter_mut().zip(caches) {
                seq.cache = cache;
            }
            (order, out)
        };
        let (order, out) = result;
        let logits = match out {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => return self.fail(running, &order, Error::compute(e)),
            Err(_) => {
                tracing::error!(
                    sequences = order.len(),
                    "a batch step panicked: failing its sequences"
                );
                return self.fail(
                    running,
                    &order,
                    Error::Compute("a batch step panicked".into()),
                );
            }
        };
        let mut finished = Vec::new();
        for (slot, mut logits) in order.into_iter().zip(logits) {
            let seq = &mut running.seqs[slot];
            if seq.pending() > 0 {
                // A chunk of a prompt: more to run before its logits mean anything.
                continue;
            }
            let Seq {
                out,
                decoder,
                tokens,
                ..
            } = seq;
            let mut emit = |event| out.send(Ok(event));
            match decoder.step(&self.tokenizer, &mut logits, &mut emit) {
                Ok(Some(next)) => tokens.push(next),
                Ok(None) => finished.push((slot, None)),
                Err(e) => finished.push((slot, Some(e))),
            }
        }
        // Highest index first, so that the others keep their place.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (slot, error) in finished {
            let seq = running.seqs.swap_remove(slot);
            self.finish(running, seq, error);
        }
        let waiting = self.inbox.waiting();
        self.publish(running, waiting);
    }

    /// Ends a sequence: its completion (or error) to its stream, its cache kept.
    fn finish(&self, running: &mut Running, seq: Seq, error: Option<Error>) {
        let Seq {
            prepared,
            mut out,
            decoder,
            tokens,
            cache,
            ..
        } = seq;
        running.stats.finished += 1;
        let result = match error {
            Some(e) => Err(e),
            None => decoder.finish(&mut |event| out.send(Ok(event))),
        };
        let outcome = match &result {
            Ok(c) if c.finish == crate::FinishReason::Cancelled => "cancelled",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::counter!(m::REQUESTS, "pool" => super::generator::POOL, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(m::REQUEST_SECONDS, "pool" => super::generator::POOL)
            .record(out.accepted.elapsed().as_secs_f64());
        if let Ok(c) = &result {
            let tenant = out.tenant.to_string();
            metrics::counter!(m::TENANT_TOKENS, "tenant" => tenant.clone(), "kind" => "prompt")
                .increment(prepared.tokens.len() as u64);
            metrics::counter!(m::TENANT_TOKENS, "tenant" => tenant, "kind" => "completion")
                .increment(c.usage.completion_tokens as u64);
            super::generator::record_usage(c, out.first);
            tracing::debug!(finish = ?c.finish, completion_tokens = c.usage.completion_tokens, "generation finished");
        }
        let _ = out.send(result.map(GenerationEvent::Done));
        if let Some(cache) = cache {
            running.keep_prefix(&tokens, cache, &self.limits);
        }
    }

    /// Fails the sequences of a step that could not run; their caches are dropped.
    fn fail(&self, running: &mut Running, slots: &[usize], error: Error) {
        let mut slots = slots.to_vec();
        slots.sort_unstable_by(|a, b| b.cmp(a));
        for slot in slots {
            let mut seq = running.seqs.swap_remove(slot);
            seq.cache = None;
            let e = Error::Compute(error.to_string());
            self.finish(running, seq, Some(e));
        }
    }
}
