//! The ractor actor that runs one instance of a durable actor: it loads the committed state,
//! replays the inbox, handles live deliveries in order and commits each result atomically.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::actor::{Context, DurableActor};
use crate::codec::{decode, encode_state};
use crate::error::panic_text;
use crate::journal::{Commit, NewTimer, Seq};
use crate::registry::Shared;
use crate::slot::Slot;

const REPLAY_CHUNK: usize = 1024;

/// Messages of an instance. Users never see them: they send through the registry.
#[derive(Debug)]
pub(crate) enum CellMsg {
    /// A message made durable at `seq`.
    Deliver {
        /// Its sequence number.
        seq: Seq,
        /// The encoded message.
        payload: bytes::Bytes,
    },
    /// Read and handle whatever the journal holds beyond what was handled.
    Rescan,
    /// Periodic idleness check for passivation.
    Tick,
}

enum Outcome {
    Handled(Vec<NewTimer>),
    Failed(String),
    Undecodable(String),
}

pub(crate) struct Cell<A: DurableActor> {
    pub(crate) shared: Arc<Shared<A>>,
}

pub(crate) struct CellState<A: DurableActor> {
    slot: Arc<Slot>,
    state: A::State,
    /// The next sequence number to handle.
    next: Seq,
    /// The owner epoch of the key's range this instance writes with.
    epoch: crate::journal::Epoch,
    last_activity: Instant,
    tick: Option<JoinHandle<()>>,
}

impl<A: DurableActor> std::fmt::Debug for CellState<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellState")
            .field("key", &self.slot.key)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl<A: DurableActor> Cell<A> {
    fn load_state(
        &self,
        slot: &Slot,
        bytes: Option<Vec<u8>>,
    ) -> Result<A::State, ActorProcessingErr> {
        match bytes {
            Some(b) => Ok(decode("state", &b)?),
            None => Ok(self.shared.actor.init(&slot.key)),
        }
    }

    /// Handles everything the journal holds from `next` on. Replayed messages are committed
    /// in batches (one state write per chunk); a failure inside a batch discards the batch and
    /// restarts the instance, which then replays one message at a time up to the failing one,
    /// so that failures are counted against a correctly committed state.
    async fn rescan(&self, st: &mut CellState<A>) -> Result<(), ActorProcessingErr> {
        loop {
            let entries = self
                .shared
                .journal
                .pending(&st.slot.jkey, st.next, REPLAY_CHUNK)
                .await?;
            if entries.is_empty() {
                return Ok(());
            }
            let careful_until = st.slot.careful_until();
            let mut batch: Option<(Seq, Seq, Vec<NewTimer>)> = None;
            for e in entries {
                if e.seq < st.next {
                    continue;
                }
                self.shared.metrics.replayed.increment(1);
                if e.seq <= careful_until {
                    self.process(st, e.seq, &e.payload, true).await?;
                    continue;
                }
                match self.run_handler(st, e.seq, &e.payload, true).await {
                    Outcome::Handled(timers) => {
                        let (_, last, all) = batch.get_or_insert((e.seq, e.seq, Vec::new()));
                        *last = e.seq;
                        all.extend(timers);
                        st.next = e.seq + 1;
                    }
                    Outcome::Undecodable(error) => {
                        self.commit_batch(st, batch.take()).await?;
                        self.dead_letter(st, e.seq, &error, 1).await?;
                    }
                    Outcome::Failed(error) if batch.is_some() => {
                        st.slot.set_careful_until(e.seq);
                        return Err(format!(
                            "{} seq {} failed during replay, replaying one by one: {error}",
                            st.slot.key, e.seq
                        )
                        .into());
                    }
                    Outcome::Failed(error) => self.failed(st, e.seq, error).await?,
                }
            }
            self.commit_batch(st, batch.take()).await?;
        }
    }

    async fn commit_batch(
        &self,
        st: &mut CellState<A>,
        batch: Option<(Seq, Seq, Vec<NewTimer>)>,
    ) -> Result<(), ActorProcessingErr> {
        let Some((from, seq, timers)) = batch else {
            return Ok(());
        };
        self.commit(st, from, seq, timers).await
    }

    async fn commit(
        &self,
        st: &mut CellState<A>,
        from: Seq,
        seq: Seq,
        timers: Vec<NewTimer>,
    ) -> Result<(), ActorProcessingErr> {
        let shared = &self.shared;
        let state = encode_state(&st.state)?;
        let earliest = timers.iter().map(|t| t.fire_at_ms).min();
        shared
            .journal
            .commit(Commit {
                key: st.slot.jkey.clone(),
                from,
                seq,
                state,
                timers,
                epoch: st.epoch,
            })
            .await?;
        st.next = seq + 1;
        st.slot.done(seq);
        shared.metrics.handled.increment(seq - from + 1);
        if let Some(at) = earliest {
            shared.timers.scheduled(at);
        }
        Ok(())
    }

    /// Runs the user's handler on one message, catching errors and panics.
    async fn run_handler(
        &self,
        st: &mut CellState<A>,
        seq: Seq,
        payload: &[u8],
        replayed: bool,
    ) -> Outcome {
        let shared = &self.shared;
        let msg: A::Msg = match decode("message", payload) {
            Ok(m) => m,
            Err(e) => return Outcome::Undecodable(e.to_string()),
        };
        let span = tracing::info_span!(
            "durable_handle",
            registry = %shared.name,
            key = %st.slot.key,
            seq,
            replayed,
        );
        let mut ctx = Context::new(st.slot.key.clone(), seq, replayed);
        let outcome = AssertUnwindSafe(shared.actor.handle(&mut ctx, &mut st.state, msg))
            .catch_unwind()
            .instrument(span)
            .await;
        match outcome {
            Ok(Ok(())) => Outcome::Handled(std::mem::take(&mut ctx.timers)),
            Ok(Err(e)) => Outcome::Failed(e.to_string()),
            Err(panic) => Outcome::Failed(format!("handler panicked: {}", panic_text(&*panic))),
        }
    }

    /// Handles and commits one message.
    async fn process(
        &self,
        st: &mut CellState<A>,
        seq: Seq,
        payload: &[u8],
        replayed: bool,
    ) -> Result<(), ActorProcessingErr> {
        match self.run_handler(st, seq, payload, replayed).await {
            Outcome::Handled(timers) => {
                if let Err(e) = self.commit(st, seq, seq, timers).await {
                    // A state that cannot be encoded is the message's failure, not storage's.
                    if e.downcast_ref::<crate::Error>()
                        .is_some_and(|e| matches!(e, crate::Error::Encode { .. }))
                    {
                        return self.failed(st, seq, e.to_string()).await;
                    }
                    return Err(e);
                }
                Ok(())
            }
            // No retry can decode it: dead-letter at once.
            Outcome::Undecodable(error) => self.dead_letter(st, seq, &error, 1).await,
            Outcome::Failed(error) => self.failed(st, seq, error).await,
        }
    }

    /// Counts a failed delivery: dead-letters the message past `max_attempts`, otherwise
    /// fails the instance so that it restarts (with backoff) and retries.
    async fn failed(
        &self,
        st: &mut CellState<A>,
        seq: Seq,
        failure: String,
    ) -> Result<(), ActorProcessingErr> {
        let shared = &self.shared;
        let attempts = shared.journal.record_failure(&st.slot.jkey, seq).await?;
        if attempts >= shared.options.max_attempts {
            return self.dead_letter(st, seq, &failure, attempts).await;
        }
        tracing::warn!(
            registry = %shared.name,
            key = %st.slot.key,
            seq,
            attempts,
            max_attempts = shared.options.max_attempts,
            error = %failure,
            "message failed, restarting actor"
        );
        Err(format!(
            "{} seq {seq} failed (attempt {attempts}/{}): {failure}",
            st.slot.key, shared.options.max_attempts
        )
        .into())
    }

    async fn dead_letter(
        &self,
        st: &mut CellState<A>,
        seq: Seq,
        error: &str,
        attempts: u32,
    ) -> Result<(), ActorProcessingErr> {
        let shared = &self.shared;
        shared
            .journal
            .dead_letter(&st.slot.jkey, seq, error, attempts, st.epoch)
            .await?;
        tracing::error!(registry = %shared.name, key = %st.slot.key, seq, attempts, error, "message moved to dead letters");
        // The failed handler may have changed the state: go back to the committed one.
        let snapshot = shared.journal.load(&st.slot.jkey).await?;
        st.state = self.load_state(&st.slot, snapshot.state)?;
        st.next = seq + 1;
        st.slot.done(seq);
        shared.metrics.dead_lettered.increment(1);
        Ok(())
    }
}

impl<A: DurableActor> Actor for Cell<A> {
    type Msg = CellMsg;
    type State = CellState<A>;
    type Arguments = (Arc<Slot>, u64);

    async fn pre_start(
        &self,
        myself: ActorRef<CellMsg>,
        (slot, generation): (Arc<Slot>, u64),
    ) -> Result<Self::State, ActorProcessingErr> {
        let shared = &self.shared;
        let epoch = shared.owner.require(&slot.jkey)?;
        let snapshot = shared.journal.load(&slot.jkey).await?;
        let mut state = self.load_state(&slot, snapshot.state)?;
        let activated = AssertUnwindSafe(shared.actor.on_activate(&slot.key, &mut state))
            .catch_unwind()
            .await;
        match activated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("on_activate of {} failed: {e}", slot.key).into()),
            Err(p) => {
                return Err(
                    format!("on_activate of {} panicked: {}", slot.key, panic_text(&*p)).into(),
                );
            }
        }
        slot.done(snapshot.applied);
        let tick = shared.options.passivate_after_ms.map(|ms| {
            let period = Duration::from_millis(ms.div_ceil(2).max(1));
            myself.send_interval(period, || CellMsg::Tick)
        });
        // Tracked only once started: a failed start is reported by the spawn, not by an event.
        shared.track(myself.get_id(), slot.clone(), generation);
        shared.metrics.active.increment(1.0);
        shared.metrics.activations.increment(1);
        Ok(CellState {
            slot,
            state,
            next: snapshot.applied + 1,
            epoch,
            last_activity: Instant::now(),
            tick,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<CellMsg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.rescan(st).await
    }

    async fn handle(
        &self,
        myself: ActorRef<CellMsg>,
        msg: CellMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CellMsg::Deliver { seq, payload } => {
                st.last_activity = Instant::now();
                if seq == st.next {
                    self.process(st, seq, &payload, false).await?;
                } else if seq > st.next {
                    // A gap: something was appended while no instance was live. Read it back.
                    self.rescan(st).await?;
                }
            }
            CellMsg::Rescan => {
                st.last_activity = Instant::now();
                self.rescan(st).await?;
            }
            CellMsg::Tick => {
                if let Some(ms) = self.shared.options.passivate_after_ms
                    && st.last_activity.elapsed() >= Duration::from_millis(ms)
                    && st.slot.in_flight() == 0
                {
                    tracing::debug!(registry = %self.shared.name, key = %st.slot.key, "passivating idle actor");
                    myself.stop(Some(crate::registry::PASSIVATED.into()));
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<CellMsg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.tick.take() {
            t.abort();
        }
        let stopped = AssertUnwindSafe(self.shared.actor.on_stop(&st.slot.key, &st.state))
            .catch_unwind()
            .await;
        match stopped {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("on_stop of {} failed: {e}", st.slot.key).into()),
            Err(p) => {
                Err(format!("on_stop of {} panicked: {}", st.slot.key, panic_text(&*p)).into())
            }
        }
    }
}
