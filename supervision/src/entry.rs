//! One addressable key's bookkeeping in a registry: its [`Life`] (the state machine), its
//! mailbox accounting (messages reserved, appended, done) and its progress, which waiters
//! watch. An entry outlives the instances that come and go for its key; an idle one is
//! forgotten (retired) and made again on the next use.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ractor::ActorRef;
use tokio::sync::watch;

use crate::journal::Seq;
use crate::life::{Action, Event, Exit, Life, State};
use crate::policy::{Backoff, Intensity};

/// Messages of an instance. Users never see them: they send through the registry.
#[derive(Debug)]
pub(crate) enum InstanceMsg {
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

/// The handle the life holds for a live instance.
pub(crate) type Handle = ActorRef<InstanceMsg>;

#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub(crate) key: Arc<str>,
    pub(crate) jkey: Arc<str>,
    life: Mutex<Life<Handle>>,
    /// Reserved by senders, not yet appended (or failed).
    queued: AtomicUsize,
    /// Bytes reserved by senders and appended but not yet done, for the byte budget.
    bytes: AtomicU64,
    /// Highest sequence number appended since this entry exists.
    last_appended: AtomicU64,
    /// The first sequence number appended through this entry: earlier ones (a backlog from
    /// before it existed) are not counted in flight.
    first_seen: AtomicU64,
    /// Replay commits one message at a time up to this sequence number (set after a failure
    /// inside a replay batch, or after a crash while the key replayed).
    careful_until: AtomicU64,
    /// Highest sequence number committed or dead-lettered; waiters watch it.
    done: watch::Sender<Seq>,
    /// How each generation ended gracefully, recorded by the instance itself before it
    /// stops: an end without one is a kill.
    graceful: Mutex<Option<(u64, Exit)>>,
    /// Callers waiting on this entry (it is not forgotten while any waits).
    pub(crate) watchers: AtomicUsize,
    /// Set when the key replays after the process died while it replayed before, until the
    /// first replay of this process has handled the backlog.
    crash: std::sync::atomic::AtomicBool,
    /// Follows the life's state, for callers waiting on it.
    state: watch::Sender<State>,
}

impl KeyEntry {
    pub(crate) fn new(key: Arc<str>, jkey: Arc<str>) -> Self {
        Self {
            key,
            jkey,
            life: Mutex::new(Life::new()),
            queued: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            last_appended: AtomicU64::new(0),
            first_seen: AtomicU64::new(0),
            careful_until: AtomicU64::new(0),
            done: watch::Sender::new(0),
            graceful: Mutex::new(None),
            watchers: AtomicUsize::new(0),
            crash: std::sync::atomic::AtomicBool::new(false),
            state: watch::Sender::new(State::Passive),
        }
    }

    /// The process died while this key replayed, before the replay made durable progress:
    /// its next replay goes carefully (each attempt counted durably before the handler runs,
    /// each commit flushed after).
    pub(crate) fn replay_after_crash(&self) {
        self.crash.store(true, Ordering::Release);
    }

    /// Whether the key replays carefully after a crash.
    pub(crate) fn crash_replay(&self) -> bool {
        self.crash.load(Ordering::Acquire)
    }

    /// The careful replay handled the backlog.
    pub(crate) fn end_crash_replay(&self) {
        self.crash.store(false, Ordering::Release);
    }

    /// Watches the life's state.
    pub(crate) fn watch_state(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    fn life(&self) -> MutexGuard<'_, Life<Handle>> {
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the event `make` builds, under the life's lock (so that what it reads, such as
    /// the messages in flight, cannot change before it is applied); returns what to do.
    pub(crate) fn on_with(
        &self,
        make: impl FnOnce(&Self) -> Event<Handle>,
        intensity: &Intensity,
        backoff: &Backoff,
    ) -> Action<Handle> {
        let mut life = self.life();
        let action = life.on(make(self), intensity, backoff);
        let now = life.state();
        self.state.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
        action
    }

    /// Applies `event` to the key's life; returns what to do.
    pub(crate) fn on(
        &self,
        event: Event<Handle>,
        intensity: &Intensity,
        backoff: &Backoff,
    ) -> Action<Handle> {
        let mut life = self.life();
        let action = life.on(event, intensity, backoff);
        let now = life.state();
        self.state.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
        action
    }

    pub(crate) fn live(&self) -> Option<Handle> {
        self.life().live().cloned()
    }

    /// Marks the live instance as ending for `exit` and returns it to stop.
    pub(crate) fn end_live(&self, exit: Exit) -> Option<Handle> {
        let life = self.life();
        let (handle, generation) = life.live_generation()?;
        self.ending(generation, exit);
        Some(handle.clone())
    }

    /// Forgets the entry if it is idle: passive, nothing in flight, nobody waiting.
    pub(crate) fn retire_if_idle(&self, intensity: &Intensity, backoff: &Backoff) -> bool {
        let mut life = self.life();
        if self.in_flight() > 0 || self.watchers.load(Ordering::Acquire) > 0 {
            return false;
        }
        life.on(Event::Retire, intensity, backoff);
        let retired = life.state() == State::Retired;
        if retired {
            self.state.send_replace(State::Retired);
        }
        retired
    }

    /// Messages accepted for this key and not yet committed or dead-lettered.
    pub(crate) fn in_flight(&self) -> usize {
        // `queued` first: `appended` raises `last_appended` before it lowers `queued`, so a
        // message moving from one to the other is counted twice at worst, never missed.
        let queued = self.queued.load(Ordering::Acquire);
        let appended = self.last_appended.load(Ordering::Acquire);
        let baseline = self
            .last_done()
            .max(self.first_seen.load(Ordering::Acquire).saturating_sub(1));
        queued + appended.saturating_sub(baseline) as usize
    }

    /// Whether a message of `len` bytes would fit now (what `try_reserve` checks).
    pub(crate) fn fits(&self, limit: usize, byte_limit: u64, len: u64) -> bool {
        let bytes = self.in_flight_bytes();
        self.in_flight() < limit && (bytes == 0 || bytes + len <= byte_limit)
    }

    /// Payload bytes accepted through this entry and not yet handled.
    pub(crate) fn in_flight_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// `n` payload bytes were handled (committed or dead-lettered). Messages of a backlog
    /// that was never reserved here release too: the count saturates at zero.
    pub(crate) fn release_bytes(&self, n: u64) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(n))
            });
    }

    /// Takes one place (of `len` bytes) in the bounded mailbox; `false` when full.
    pub(crate) fn try_reserve(&self, limit: usize, byte_limit: u64, len: u64) -> bool {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let bytes = self.bytes.fetch_add(len, Ordering::AcqRel) + len;
        // One message always fits an empty mailbox, whatever its size.
        if self.in_flight() > limit || (bytes > byte_limit && bytes != len) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.release_bytes(len);
            return false;
        }
        true
    }

    /// Gives back a place whose append failed.
    pub(crate) fn unreserve(&self, len: u64) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.release_bytes(len);
        self.done.send_modify(|_| {});
    }

    /// A reserved message became durable at `seq`.
    pub(crate) fn appended(&self, seq: Seq) {
        self.seen(seq);
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// A message was appended outside the send path (timer, re-drive) at `seq`.
    pub(crate) fn seen(&self, seq: Seq) {
        let _ = self
            .first_seen
            .compare_exchange(0, seq, Ordering::AcqRel, Ordering::Acquire);
        self.last_appended.fetch_max(seq, Ordering::AcqRel);
    }

    pub(crate) fn careful_until(&self) -> Seq {
        self.careful_until.load(Ordering::Acquire)
    }

    pub(crate) fn set_careful_until(&self, seq: Seq) {
        self.careful_until.fetch_max(seq, Ordering::AcqRel);
    }

    pub(crate) fn last_done(&self) -> Seq {
        *self.done.borrow()
    }

    /// The instance committed or dead-lettered everything up to `seq`.
    pub(crate) fn done(&self, seq: Seq) {
        self.done.send_if_modified(|d| {
            if seq > *d {
                *d = seq;
                true
            } else {
                false
            }
        });
    }

    /// Watches progress (the highest seq done).
    pub(crate) fn watch(&self) -> watch::Receiver<Seq> {
        self.done.subscribe()
    }

    /// The instance of `generation` records how it ends before it stops gracefully.
    pub(crate) fn ending(&self, generation: u64, exit: Exit) {
        *self.graceful.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, exit));
    }

    /// Whether the instance of `generation` was asked to end (its range released).
    pub(crate) fn released(&self, generation: u64) -> bool {
        matches!(
            *self.graceful.lock().unwrap_or_else(|p| p.into_inner()),
            Some((g, Exit::Released)) if g == generation
        )
    }

    /// How the instance of `generation` ended: as it recorded, or killed.
    pub(crate) fn exit_of(&self, generation: u64, failed: bool) -> Exit {
        if failed {
            return Exit::Failed;
        }
        match *self.graceful.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((g, exit)) if g == generation => exit,
            _ => Exit::Killed,
        }
    }
}
