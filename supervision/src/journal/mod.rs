//! The journal: the persistent mailbox and state store behind every durable actor.
//!
//! A journal holds, per actor key, an ordered inbox of messages not yet acknowledged by the
//! actor, the actor's last committed state with the sequence number it covers, failure
//! counts, dead letters and durable timers. Backends implement [`Journal`]; every backend must
//! pass the contract suite in `contract` (feature `test-util`).

mod inbox;
mod sled;

#[cfg(any(test, feature = "test-util"))]
pub mod contract;

use std::sync::Arc;

use async_trait::async_trait;
pub use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Result;

pub use self::sled::{
    CheckReport, Durability, SalvageReport, SledJournal, SledOptions, check, salvage,
};
pub use crate::ids::{Epoch, KeyRange, Seq, range_of};

/// One message to append to a key's inbox.
#[derive(Debug, Clone)]
pub struct Append {
    /// The journal key of the receiving actor.
    pub key: Arc<str>,
    /// The encoded message.
    pub payload: Bytes,
    /// The owner epoch of the key's range the sender holds; a stale one is refused.
    pub epoch: Epoch,
}

/// A message in a key's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number within the key.
    pub seq: Seq,
    /// The encoded message.
    pub payload: Bytes,
}

/// The last committed state of an actor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every message up to and including this sequence number has been applied or dead-lettered.
    pub applied: Seq,
    /// The encoded state, `None` if the actor never committed one.
    pub state: Option<Vec<u8>>,
}

/// A timer to persist together with a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTimer {
    /// When it fires, in milliseconds since the Unix epoch.
    pub fire_at_ms: u64,
    /// The encoded message it delivers to its own actor.
    pub payload: Vec<u8>,
}

/// The atomic unit of progress: the state after handling `from..=seq`, and their acks.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The actor's journal key.
    pub key: Arc<str>,
    /// The first message this commit acknowledges (equal to `seq` for a single message).
    pub from: Seq,
    /// The last message handled; `from..=seq` leave the inbox.
    pub seq: Seq,
    /// The new encoded state.
    pub state: Vec<u8>,
    /// Timers scheduled by the handler; persisted in the same atomic write.
    pub timers: Vec<NewTimer>,
    /// The owner epoch of the key's range the committer holds; a stale one is refused.
    pub epoch: Epoch,
}

/// A stored durable timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// The journal key of the actor it wakes.
    pub key: Arc<str>,
    /// When it fires, in milliseconds since the Unix epoch.
    pub fire_at_ms: u64,
    /// A unique id within (key, fire time).
    pub id: u64,
    /// The encoded message.
    pub payload: Vec<u8>,
}

/// A message that failed too often and was moved aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The journal key of the actor that could not handle it.
    pub key: String,
    /// Its sequence number in that actor's inbox.
    pub seq: Seq,
    /// The encoded message.
    pub payload: Vec<u8>,
    /// The last error.
    pub error: String,
    /// How many deliveries failed.
    pub attempts: u32,
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Storage for durable actors. All methods are safe to call concurrently; appends and timer
/// firings for one key are serialised by the backend so that sequence numbers have no gaps.
///
/// # Ownership and fencing
/// Keys fall into [`KeyRange`]s ([`Journal::range_of`]). A writer [`acquire`](Journal::acquire)s
/// a range, which bumps its owner [`Epoch`]; every append, commit, dead letter, re-drive and
/// timer firing carries the epoch and is refused with [`Error::Fenced`](crate::Error::Fenced)
/// when it is no longer the range's current one. A commit is also a compare-and-set: it
/// applies only when `Commit::from == applied + 1`, so a late commit of a stopped instance
/// can never overwrite its successor's.
#[async_trait]
pub trait Journal: Send + Sync + std::fmt::Debug + 'static {
    /// How many key ranges this journal divides its keys into.
    fn ranges(&self) -> u32;

    /// The range `key` belongs to.
    fn range_of(&self, key: &str) -> KeyRange {
        range_of(key, self.ranges())
    }

    /// Whether the journal was not closed cleanly before this open (a crash or a kill): the
    /// runtime then counts replays of a key's first pending message as delivery attempts.
    fn recovered_from_crash(&self) -> bool;

    /// Takes ownership of `range`: its epoch is bumped durably (fencing every earlier owner)
    /// and what is pending in it is loaded. Returns the new epoch.
    async fn acquire(&self, range: KeyRange) -> Result<Epoch>;

    /// Takes ownership of several ranges at once (see [`Journal::acquire`]); a backend may
    /// make all the epochs durable in one write.
    async fn acquire_many(&self, ranges: &[KeyRange]) -> Result<Vec<Epoch>> {
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            out.push(self.acquire(*r).await?);
        }
        Ok(out)
    }

    /// Gives up `range` held at `epoch`: staged commits are made durable, in-memory payloads
    /// of its keys dropped, and further writes at `epoch` refused.
    async fn release(&self, range: KeyRange, epoch: Epoch) -> Result<()>;

    /// Appends a batch, assigning each entry the next sequence number of its key, in batch
    /// order. When this returns, the batch is as durable as the backend's durability mode
    /// promises (see [`Durability`]). A stale epoch on any entry refuses the whole batch
    /// (nothing of it is written).
    async fn append(&self, batch: &[Append]) -> Result<Vec<Seq>>;

    /// The last committed state of `key` (default snapshot when none).
    async fn load(&self, key: &str) -> Result<Snapshot>;

    /// Up to `limit` inbox entries of `key` with `seq >= from`, in order.
    async fn pending(&self, key: &str, from: Seq, limit: usize) -> Result<Vec<Entry>>;

    /// Atomically stores the new state, acknowledges `from..=seq` (they are never returned by
    /// `pending` again) and persists the new timers, if `from == applied + 1` and the epoch
    /// is current; otherwise nothing changes and the commit is refused
    /// ([`Error::Fenced`](crate::Error::Fenced)). A backend may make the commit durable later
    /// (at its next flush); until then a crash replays the acknowledged messages.
    async fn commit(&self, commit: Commit) -> Result<()>;

    /// Records one failed delivery of (`key`, `seq`); returns the number of failures of that
    /// message. Only the message an actor is stuck on has a count: a failure of a later
    /// message starts again at 1. Durable when it returns.
    async fn record_failure(&self, key: &str, seq: Seq) -> Result<u32>;

    /// Records, for each key, that its replay after a crash begins at the given seq (durably,
    /// all in one write); returns per key whether the previous record named the same seq:
    /// the replay before this one made no durable progress (the process died during it).
    async fn begin_replays(&self, keys: &[(Arc<str>, Seq)]) -> Result<Vec<bool>>;

    /// Atomically moves (`key`, `seq`) from the inbox to the dead letters and acknowledges it,
    /// leaving the committed state as it is; `seq` must be `applied + 1`.
    async fn dead_letter(
        &self,
        key: &str,
        seq: Seq,
        error: &str,
        attempts: u32,
        epoch: Epoch,
    ) -> Result<()>;

    /// Dead letters whose key starts with `prefix`, in key and sequence order.
    async fn dead_letters(&self, prefix: &str) -> Result<Vec<DeadLetter>>;

    /// Atomically removes a dead letter and appends its payload to its key's inbox as a new
    /// message; returns the new sequence number.
    async fn redrive(&self, key: &str, seq: Seq, epoch: Epoch) -> Result<Seq>;

    /// The earliest timer fire time in `range`, if any timer is stored there.
    async fn next_timer(&self, range: KeyRange) -> Result<Option<u64>>;

    /// Up to `limit` timers of `range` due at `now_ms`, earliest first.
    async fn due_timers(&self, range: KeyRange, now_ms: u64, limit: usize) -> Result<Vec<Timer>>;

    /// Atomically removes `timer` and appends its payload to its key's inbox; returns the new
    /// sequence number, or `None` if the timer was already fired.
    async fn fire_timer(&self, timer: &Timer, epoch: Epoch) -> Result<Option<Seq>>;

    /// Keys of `range` starting with `prefix` that have unacknowledged inbox entries.
    async fn keys_with_pending(&self, range: KeyRange, prefix: &str) -> Result<Vec<String>>;

    /// Keys of `ranges` starting with `prefix` that have a committed state (whatever state:
    /// an actor reset to its initial state is listed too). With
    /// [`keys_with_pending`](Journal::keys_with_pending) it lists every key a registry has,
    /// when pending keys are listed first: a key only ever moves from pending to committed,
    /// so one that commits in between is found by the second call.
    async fn keys_with_state(&self, ranges: &[KeyRange], prefix: &str) -> Result<Vec<String>>;

    /// Removes dead letter (`key`, `seq`) for good; [`Error::NoSuchDeadLetter`](crate::Error::NoSuchDeadLetter)
    /// if there is none.
    async fn discard_dead_letter(&self, key: &str, seq: Seq, epoch: Epoch) -> Result<()>;

    /// Closes the inbox's active segment (if it holds anything), so that it is deleted at the
    /// first flush after every message in it is acknowledged, instead of once it fills up.
    /// Erasure calls it (then flushes) so that the messages it erased leave the disk.
    async fn roll(&self) -> Result<()>;

    /// Removes every stored timer of `key`; returns how many.
    async fn discard_timers(&self, key: &str, epoch: Epoch) -> Result<u64>;

    /// Makes everything written so far durable.
    async fn flush(&self) -> Result<()>;

    /// Makes everything durable, records a clean close and refuses further writes.
    async fn close(&self) -> Result<()>;
}
