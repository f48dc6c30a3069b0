//! The ractor actor that runs one instance of a durable actor: it loads the committed state,
//! replays the inbox, handles live deliveries in order and commits each result atomically
//! (a compare-and-set on the key's applied seq, at its range's owner epoch).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::FutureExt;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use tokio::time::Instant;
use tracing::Instrument;

use crate::actor::{Context, DurableActor};
use crate::clock::Clock;
use crate::codec::{decode, encode_state};
use crate::entry::{InstanceMsg, KeyEntry};
use crate::error::{Error, panic_text};
use crate::journal::{Commit, Epoch, Journal, NewTimer, Seq};
use crate::life::Exit;
use crate::metrics::RegistryMetrics;
use crate::options::RegistryOptions;
use crate::owner::Ownership;
use crate::timers::TimerHandle;

const REPLAY_CHUNK: usize = 1024;
/// A replay batch commits early past this many timers (the journal numbers a commit's timers
/// in 16 bits).
const MAX_TIMERS_PER_COMMIT: usize = 65_536 - crate::actor::MAX_TIMERS_PER_MESSAGE;

/// What every instance of one registry shares.
pub(crate) struct Kind<A: DurableActor> {
    pub(crate) actor: A,
    pub(crate) name: String,
    pub(crate) options: RegistryOptions,
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) metrics: RegistryMetrics,
    pub(crate) timers: TimerHandle,
    pub(crate) owner: Arc<Ownership>,
    pub(crate) clock: Clock,
    /// Running instances: their entry and generation (for their exit events).
    instances: Mutex<HashMap<ActorId, (Arc<KeyEntry>, u64)>>,
    /// Set when the registry stops: nothing new starts, replays end between messages.
    pub(crate) stopping: AtomicBool,
}

impl<A: DurableActor> Kind<A> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        actor: A,
        options: RegistryOptions,
        journal: Arc<dyn Journal>,
        timers: TimerHandle,
        owner: Arc<Ownership>,
        clock: Clock,
    ) -> Self {
        Self {
            actor,
            name: options.name.clone(),
            metrics: RegistryMetrics::new(&options.name),
            options,
            journal,
            timers,
            owner,
            clock,
            instances: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        }
    }

    fn instances(&self) -> MutexGuard<'_, HashMap<ActorId, (Arc<KeyEntry>, u64)>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry and generation of an instance that ended (once).
    pub(crate) fn ended(&self, id: ActorId) -> Option<(Arc<KeyEntry>, u64)> {
        self.instances().remove(&id)
    }

    /// Running instances.
    pub(crate) fn live(&self) -> usize {
        self.instances().len()
    }
}

enum Outcome {
    Handled(Vec<NewTimer>),
    Failed(String),
    Undecodable(String),
}

pub(crate) struct Instance<A: DurableActor> {
    pub(crate) kind: Arc<Kind<A>>,
}

pub(crate) struct InstanceState<A: DurableActor> {
    entry: Arc<KeyEntry>,
    generation: u64,
    state: A::State,
    /// The next sequence number to handle.
    next: Seq,
    /// The owner epoch of the key's range this instance writes with.
    epoch: Epoch,
    last_activity: Instant,
    tick: Option<JoinHandle<()>>,
}

impl<A: DurableActor> std::fmt::Debug for InstanceState<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceState")
            .field("key", &self.entry.key)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

fn is_encode(e: &ActorProcessingErr) -> bool {
    e.downcast_ref::<Error>()
        .is_some_and(|e| matches!(e, Error::Encode { .. }))
}

impl<A: DurableActor> Instance<A> {
    fn load_state(
        &self,
        key: &str,
        bytes: Option<Vec<u8>>,
    ) -> Result<A::State, ActorProcessingErr> {
        match bytes {
            Some(b) => Ok(decode("state", &b)?),
            None => Ok(self.kind.actor.init(key)),
        }
    }

    /// Whether a replay must end before its next message: the registry stops, or the key's
    /// range is released (a graceful stop waits for the message in hand, not the backlog).
    fn must_yield(&self, st: &InstanceState<A>) -> bool {
        self.kind.stopping.load(Ordering::Acquire) || st.entry.released(st.generation)
    }

    /// Handles everything the journal holds from `next` on. Messages are committed in
    /// batches (one state write per chunk); a failure inside a batch discards the batch and
    /// restarts the instance, which then goes one message at a time up to the failing one,
    /// so that failures are counted against a correctly committed state.
    async fn rescan(
        &self,
        st: &mut InstanceState<A>,
        replayed: bool,
    ) -> Result<(), ActorProcessingErr> {
        loop {
            if self.must_yield(st) {
                // A graceful stop waits for the message in hand, not for a whole backlog:
                // the rest stays in the journal.
                return Ok(());
            }
            let entries = self
                .kind
                .journal
                .pending(&st.entry.jkey, st.next, REPLAY_CHUNK)
                .await?;
            if entries.is_empty() {
                return Ok(());
            }
            let careful_until = st.entry.careful_until();
            let mut batch: Option<(Seq, Seq, Vec<NewTimer>, u64)> = None;
            for e in entries {
                if e.seq < st.next {
                    continue;
                }
                if replayed {
                    self.kind.metrics.replayed.increment(1);
                }
                let len = e.payload.len() as u64;
                if self.must_yield(st) {
                    return self.commit_batch(st, batch.take()).await;
                }
                if e.seq <= careful_until || st.entry.crash_replay() {
                    self.commit_batch(st, batch.take()).await?;
                    self.process(st, e.seq, &e.payload, replayed).await?;
                    continue;
                }
                match self.run_handler(st, e.seq, &e.payload, replayed).await {
                    Outcome::Handled(timers) => {
                        let (_, last, all, bytes) =
                            batch.get_or_insert((e.seq, e.seq, Vec::new(), 0));
                        *last = e.seq;
                        *bytes += len;
                        all.extend(timers);
                        st.next = e.seq + 1;
                        // Timer ids are unique within one commit up to 65,536 timers.
                        if all.len() > MAX_TIMERS_PER_COMMIT {
                            self.commit_batch(st, batch.take()).await?;
                        }
                    }
                    Outcome::Undecodable(error) => {
                        self.commit_batch(st, batch.take()).await?;
                        self.dead_letter(st, e.seq, &error, 1, len).await?;
                    }
                    Outcome::Failed(error) if batch.is_some() => {
                        st.entry.set_careful_until(e.seq);
                        return Err(format!(
                            "{} seq {} failed in a batch, going one by one: {error}",
                            st.entry.key, e.seq
                        )
                        .into());
                    }
                    Outcome::Failed(error) => self.failed(st, e.seq, error, None, len).await?,
                }
            }
            self.commit_batch(st, batch.take()).await?;
        }
    }

    async fn commit_batch(
        &self,
        st: &mut InstanceState<A>,
        batch: Option<(Seq, Seq, Vec<NewTimer>, u64)>,
    ) -> Result<(), ActorProcessingErr> {
        let Some((from, seq, timers, bytes)) = batch else {
            return Ok(());
        };
        match self.commit(st, from, seq, timers, bytes).await {
            // A state that cannot be encoded: find the message that makes it so, one by one
            // (each then counts as a failure and ends in the dead letters).
            Err(e) if is_encode(&e) => {
                st.entry.set_careful_until(seq);
                Err(format!(
                    "{} seqs {from}..={seq}: {e}; going one by one",
                    st.entry.key
                )
                .into())
            }
            other => other,
        }
    }

    async fn commit(
        &self,
        st: &mut InstanceState<A>,
        from: Seq,
        seq: Seq,
        timers: Vec<NewTimer>,
        bytes: u64,
    ) -> Result<(), ActorProcessingErr> {
        let kind = &self.kind;
        let state = encode_state(&st.state)?;
        let earliest = timers.iter().map(|t| t.fire_at_ms).min();
        kind.journal
            .commit(Commit {
                key: st.entry.jkey.clone(),
                from,
                seq,
                state,
                timers,
                epoch: st.epoch,
            })
            .await?;
        st.next = seq + 1;
        // Bytes first: a sender woken by the progress must see the room.
        st.entry.release_bytes(bytes);
        st.entry.done(seq);
        kind.metrics.handled.increment(seq - from + 1);
        if let Some(at) = earliest {
            kind.timers.scheduled(at);
        }
        Ok(())
    }

    /// Runs the user's handler on one message, catching errors and panics.
    async fn run_handler(
        &self,
        st: &mut InstanceState<A>,
        seq: Seq,
        payload: &[u8],
        replayed: bool,
    ) -> Outcome {
        let kind = &self.kind;
        let msg: A::Msg = match decode("message", payload) {
            Ok(m) => m,
            Err(e) => return Outcome::Undecodable(e.to_string()),
        };
        let span = tracing::info_span!(
            "durable_handle",
            registry = %kind.name,
            key = %st.entry.key,
            seq,
            replayed,
        );
        let mut ctx = Context::new(st.entry.key.clone(), seq, replayed, kind.clock);
        let outcome = AssertUnwindSafe(kind.actor.handle(&mut ctx, &mut st.state, msg))
            .catch_unwind()
            .instrument(span)
            .await;
        match outcome {
            Ok(Ok(())) => Outcome::Handled(std::mem::take(&mut ctx.timers)),
            Ok(Err(e)) => Outcome::Failed(e.to_string()),
            Err(panic) => Outcome::Failed(format!("handler panicked: {}", panic_text(&*panic))),
        }
    }

    /// Handles and commits one message. For a key that replays after the process died while
    /// handling it, the attempt is counted durably first, and the commit flushed after: a
    /// message that kills the process every time ends in the dead letters.
    async fn process(
        &self,
        st: &mut InstanceState<A>,
        seq: Seq,
        payload: &[u8],
        replayed: bool,
    ) -> Result<(), ActorProcessingErr> {
        let len = payload.len() as u64;
        let counted = match st.entry.crash_replay() {
            false => None,
            true => {
                let attempts = self
                    .kind
                    .journal
                    .record_failure(&st.entry.jkey, seq)
                    .await?;
                if attempts > self.kind.options.max_attempts {
                    let error = format!(
                        "the process died while handling it ({} deliveries)",
                        attempts - 1
                    );
                    return self.dead_letter(st, seq, &error, attempts - 1, len).await;
                }
                Some(attempts)
            }
        };
        match self.run_handler(st, seq, payload, replayed).await {
            Outcome::Handled(timers) => match self.commit(st, seq, seq, timers, len).await {
                // A state that cannot be encoded is the message's failure, not storage's.
                Err(e) if is_encode(&e) => self.failed(st, seq, e.to_string(), counted, len).await,
                Err(e) => Err(e),
                Ok(()) if counted.is_some() => Ok(self.kind.journal.flush().await?),
                Ok(()) => Ok(()),
            },
            // No retry can decode it: dead-letter at once.
            Outcome::Undecodable(error) => self.dead_letter(st, seq, &error, 1, len).await,
            Outcome::Failed(error) => self.failed(st, seq, error, counted, len).await,
        }
    }

    /// Counts a failed delivery (unless `counted` already did): dead-letters the message past
    /// `max_attempts`, otherwise fails the instance so that it restarts and retries.
    async fn failed(
        &self,
        st: &mut InstanceState<A>,
        seq: Seq,
        failure: String,
        counted: Option<u32>,
        len: u64,
    ) -> Result<(), ActorProcessingErr> {
        let kind = &self.kind;
        let attempts = match counted {
            Some(n) => n,
            None => kind.journal.record_failure(&st.entry.jkey, seq).await?,
        };
        if attempts >= kind.options.max_attempts {
            return self.dead_letter(st, seq, &failure, attempts, len).await;
        }
        tracing::warn!(
            registry = %kind.name,
            key = %st.entry.key,
            seq,
            attempts,
            max_attempts = kind.options.max_attempts,
            error = %failure,
            "message failed, restarting actor"
        );
        Err(format!(
            "{} seq {seq} failed (attempt {attempts}/{}): {failure}",
            st.entry.key, kind.options.max_attempts
        )
        .into())
    }

    async fn dead_letter(
        &self,
        st: &mut InstanceState<A>,
        seq: Seq,
        error: &str,
        attempts: u32,
        len: u64,
    ) -> Result<(), ActorProcessingErr> {
        let kind = &self.kind;
        kind.journal
            .dead_letter(&st.entry.jkey, seq, error, attempts, st.epoch)
            .await?;
        tracing::error!(registry = %kind.name, key = %st.entry.key, seq, attempts, error, "message moved to dead letters");
        // The failed handler may have changed the state: go back to the committed one.
        let snapshot = kind.journal.load(&st.entry.jkey).await?;
        st.state = self.load_state(&st.entry.key, snapshot.state)?;
        st.next = seq + 1;
        st.entry.release_bytes(len);
        st.entry.done(seq);
        kind.metrics.dead_lettered.increment(1);
        Ok(())
    }
}

impl<A: DurableActor> Actor for Instance<A> {
    type Msg = InstanceMsg;
    type State = InstanceState<A>;
    type Arguments = (Arc<KeyEntry>, u64);

    async fn pre_start(
        &self,
        myself: ActorRef<InstanceMsg>,
        (entry, generation): (Arc<KeyEntry>, u64),
    ) -> Result<Self::State, ActorProcessingErr> {
        let kind = &self.kind;
        let epoch = kind.owner.require(&entry.jkey)?;
        let snapshot = kind.journal.load(&entry.jkey).await?;
        let mut state = self.load_state(&entry.key, snapshot.state)?;
        let activated = AssertUnwindSafe(kind.actor.on_activate(&entry.key, &mut state))
            .catch_unwind()
            .await;
        match activated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("on_activate of {} failed: {e}", entry.key).into()),
            Err(p) => {
                return Err(
                    format!("on_activate of {} panicked: {}", entry.key, panic_text(&*p)).into(),
                );
            }
        }
        entry.done(snapshot.applied);
        let tick = kind.options.passivate_after_ms.map(|ms| {
            let period = Duration::from_millis(ms.div_ceil(2).max(1));
            myself.send_interval(period, || InstanceMsg::Tick)
        });
        // Tracked only once started: a failed start is reported by the spawn, not by an event.
        kind.instances()
            .insert(myself.get_id(), (entry.clone(), generation));
        kind.metrics.active.increment(1.0);
        kind.metrics.activations.increment(1);
        Ok(InstanceState {
            entry,
            generation,
            state,
            next: snapshot.applied + 1,
            epoch,
            last_activity: Instant::now(),
            tick,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<InstanceMsg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.rescan(st, true).await?;
        st.entry.end_crash_replay();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<InstanceMsg>,
        msg: InstanceMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            InstanceMsg::Deliver { seq, payload } => {
                st.last_activity = Instant::now();
                if seq == st.next && st.entry.careful_until() < seq {
                    self.process(st, seq, &payload, false).await?;
                } else if seq >= st.next {
                    // A gap (delivered out of order, or appended while no instance ran):
                    // read it back from the journal.
                    self.rescan(st, false).await?;
                }
            }
            InstanceMsg::Rescan => {
                st.last_activity = Instant::now();
                self.rescan(st, false).await?;
            }
            InstanceMsg::Tick => {
                if let Some(ms) = self.kind.options.passivate_after_ms
                    && st.last_activity.elapsed() >= Duration::from_millis(ms)
                    && st.entry.in_flight() == 0
                {
                    tracing::debug!(registry = %self.kind.name, key = %st.entry.key, "passivating idle actor");
                    st.entry.ending(st.generation, Exit::Passivated);
                    myself.stop(None);
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<InstanceMsg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.tick.take() {
            t.abort();
        }
        let stopped = AssertUnwindSafe(self.kind.actor.on_stop(&st.entry.key, &st.state))
            .catch_unwind()
            .await;
        // The stop happens either way: a failing on_stop is logged, never a restart (which
        // would passivate and fail again, forever).
        let failure = match stopped {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(p) => format!("panicked: {}", panic_text(&*p)),
        };
        tracing::warn!(registry = %self.kind.name, key = %st.entry.key, error = %failure, "on_stop failed");
        Ok(())
    }
}
