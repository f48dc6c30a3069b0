//! One addressable durable actor's bookkeeping: its life cycle, its in-flight count and its
//! progress. A slot outlives the actor instances that come and go for its key.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use ractor::ActorRef;
use tokio::sync::Notify;

use crate::cell::CellMsg;
use crate::journal::Seq;
use crate::policy::RestartWindow;

/// Where the single instance of a key is in its life cycle. Every transition happens under
/// the slot's lock, and only a transition into `Starting` spawns an instance, so a key never
/// has two live instances.
#[derive(Debug)]
pub(crate) enum Life {
    /// No instance; the next message activates one.
    Passive,
    /// An instance of this generation is being spawned. Only that spawn may go `Live`, and
    /// only that instance's exit counts: a late spawn or a stale exit is ignored.
    Starting(u64),
    /// The instance is running.
    Live(ActorRef<CellMsg>),
    /// The instance failed; a restart is scheduled after a backoff.
    Restarting,
    /// The instance failed more often than the restart intensity allows; the next message
    /// (or an explicit wake) starts it again.
    Parked,
}

/// Activates an instance for a slot (implemented by the registry).
pub(crate) trait Activate: Send + Sync {
    /// Spawns generation `generation` of the slot's instance.
    fn activate(&self, slot: Arc<Slot>, generation: u64);
    /// The slot was retired (dropped while idle): hand the key's event to its current slot.
    fn reroute(&self, key: &str, appended: Option<Seq>);
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) key: Arc<str>,
    pub(crate) jkey: Arc<str>,
    life: Mutex<Life>,
    /// Reserved by senders, not yet appended.
    queued: AtomicUsize,
    /// Highest sequence number appended since this slot exists.
    last_appended: AtomicU64,
    /// Highest sequence number committed or dead-lettered.
    last_done: AtomicU64,
    /// The first sequence number appended through this slot: earlier ones (a backlog from
    /// before this slot existed) are not counted in flight.
    first_seen: AtomicU64,
    /// Replay commits one message at a time up to this sequence number (set after a failure
    /// inside a replay batch).
    careful_until: AtomicU64,
    pub(crate) progress: Notify,
    /// Notified when an instance goes live or the key is parked.
    pub(crate) started: Notify,
    pub(crate) window: Mutex<RestartWindow>,
    /// Set (under the life lock) when the registry dropped this slot; it starts nothing more.
    retired: AtomicBool,
    generations: AtomicU64,
    owner: Weak<dyn Activate>,
}

impl Slot {
    pub(crate) fn new(key: Arc<str>, jkey: Arc<str>, owner: Weak<dyn Activate>) -> Self {
        Self {
            key,
            jkey,
            life: Mutex::new(Life::Passive),
            queued: AtomicUsize::new(0),
            last_appended: AtomicU64::new(0),
            last_done: AtomicU64::new(0),
            first_seen: AtomicU64::new(0),
            careful_until: AtomicU64::new(0),
            progress: Notify::new(),
            started: Notify::new(),
            window: Mutex::new(RestartWindow::default()),
            retired: AtomicBool::new(false),
            generations: AtomicU64::new(0),
            owner,
        }
    }

    pub(crate) fn life(&self) -> MutexGuard<'_, Life> {
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages accepted for this key and not yet committed or dead-lettered.
    pub(crate) fn in_flight(&self) -> usize {
        let appended = self.last_appended.load(Ordering::Acquire);
        let baseline = self
            .last_done
            .load(Ordering::Acquire)
            .max(self.first_seen.load(Ordering::Acquire).saturating_sub(1));
        self.queued.load(Ordering::Acquire) + appended.saturating_sub(baseline) as usize
    }

    fn seen(&self, seq: Seq) {
        let _ = self
            .first_seen
            .compare_exchange(0, seq, Ordering::AcqRel, Ordering::Acquire);
        self.last_appended.fetch_max(seq, Ordering::AcqRel);
    }

    /// Takes one place in the bounded mailbox; `false` when full.
    pub(crate) fn try_reserve(&self, limit: usize) -> bool {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.in_flight() > limit {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back a place whose append failed.
    pub(crate) fn unreserve(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.progress.notify_waiters();
    }

    pub(crate) fn careful_until(&self) -> Seq {
        self.careful_until.load(Ordering::Acquire)
    }

    pub(crate) fn set_careful_until(&self, seq: Seq) {
        self.careful_until.fetch_max(seq, Ordering::AcqRel);
    }

    pub(crate) fn last_done(&self) -> Seq {
        self.last_done.load(Ordering::Acquire)
    }

    /// The instance committed or dead-lettered `seq`.
    pub(crate) fn done(&self, seq: Seq) {
        self.last_done.fetch_max(seq, Ordering::AcqRel);
        self.progress.notify_waiters();
    }

    /// A message was appended outside the send path (timer, re-drive): count it, deliver it.
    pub(crate) fn appended_external(self: &Arc<Self>, seq: Seq) {
        self.seen(seq);
        self.deliver(seq, None);
    }

    /// The writer made `seq` durable: count it and hand it to the live instance, or start one.
    pub(crate) fn appended(self: &Arc<Self>, seq: Seq, payload: bytes::Bytes) {
        self.seen(seq);
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.deliver(seq, Some(payload));
    }

    fn deliver(self: &Arc<Self>, seq: Seq, payload: Option<bytes::Bytes>) {
        let life = self.life();
        if self.retired.load(Ordering::Acquire) {
            drop(life);
            self.reroute(Some(seq));
            return;
        }
        match &*life {
            Life::Live(cell) => {
                let msg = match payload {
                    Some(payload) => CellMsg::Deliver { seq, payload },
                    None => CellMsg::Rescan,
                };
                // A failed cast means the instance is dying; its supervision event restarts
                // or reactivates it, and the new instance reads this message from the journal.
                let _ = cell.cast(msg);
            }
            Life::Passive | Life::Parked => self.begin_start(life),
            Life::Starting(_) | Life::Restarting => {}
        }
    }

    /// Starts an instance if none is live or scheduled.
    pub(crate) fn wake(self: &Arc<Self>) {
        let life = self.life();
        if self.retired.load(Ordering::Acquire) {
            drop(life);
            self.reroute(None);
            return;
        }
        if matches!(&*life, Life::Passive | Life::Parked) {
            self.begin_start(life);
        }
    }

    /// Moves a failed key from `Restarting` to a new start (after its backoff).
    pub(crate) fn restart(self: &Arc<Self>) {
        let life = self.life();
        if matches!(&*life, Life::Restarting) {
            self.begin_start(life);
        }
    }

    /// The one transition into `Starting`: a new generation, then a spawn outside the lock.
    fn begin_start(self: &Arc<Self>, mut life: MutexGuard<'_, Life>) {
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        *life = Life::Starting(generation);
        drop(life);
        if let Some(owner) = self.owner.upgrade() {
            owner.activate(self.clone(), generation);
        }
    }

    /// This slot was retired: hand the event to the key's current slot.
    fn reroute(&self, appended: Option<Seq>) {
        if let Some(owner) = self.owner.upgrade() {
            owner.reroute(&self.key, appended);
        }
    }

    /// Retires an idle slot (the registry drops it from its map, under the map lock); `false`
    /// if it is not idle.
    pub(crate) fn retire_if_idle(&self) -> bool {
        let life = self.life();
        if self.in_flight() == 0 && matches!(&*life, Life::Passive) {
            self.retired.store(true, Ordering::Release);
            true
        } else {
            false
        }
    }
}
