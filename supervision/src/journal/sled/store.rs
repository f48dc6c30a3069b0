//! The embedded journal's shared core: sequence assignment, owner epochs, staged commits,
//! flushes, the marker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use super::layout::{
    DEAD, EPOCH_KEY, FAILURES, LOG_KEY, Marker, STATE, engine_error, key_prefix, owner_key,
    seq_key, state_dir, timer_key, write_marker,
};
use super::{Durability, read_snapshot, state_record};
use crate::codec::unseal;
use crate::error::{Error, Fence, Result};
use crate::journal::inbox::Inbox;
use crate::journal::inbox::record::Origin;
use crate::journal::{Append, Bytes, Epoch, KeyRange, Seq, Snapshot, range_of};

const SEQ_CACHE_LIMIT: usize = 100_000;

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) db: sled::Db,
    pub(super) inbox: Inbox,
    pub(super) path: PathBuf,
    pub(super) durability: Durability,
    pub(super) ranges: u32,
    pub(super) max_message_bytes: usize,
    /// The journal was not closed cleanly before this open.
    pub(super) unclean: bool,
    /// The last sequence number assigned per key; a cache, rebuilt on a miss. Held while
    /// assigning and appending so that sequence numbers have no gaps.
    pub(super) seqs: Mutex<HashMap<Arc<str>, Seq>>,
    /// State-store flush epoch: stored with every flush, durable once the flush returns.
    pub(super) epoch: AtomicU64,
    /// What the marker file says.
    pub(super) marked: Mutex<Marker>,
    /// Serialises state-store flushes so that epochs become durable in order.
    pub(super) flush_lock: Mutex<()>,
    /// Serialises writes of staged commits (taken after `flush_lock` when both are held).
    pub(super) commit_lock: Mutex<()>,
    /// Commits not yet written to the state store.
    pub(super) staged: Mutex<HashMap<Arc<str>, StagedCommit>>,
    /// The owner epoch of every range this journal holds.
    pub(super) owners: RwLock<HashMap<u32, Epoch>>,
    /// Set by `close`: writes are refused.
    pub(super) closed: AtomicBool,
}

/// A commit waiting to be written: the latest per key, so that many commits of one key
/// between two writes cost one. Reads consult it first.
#[derive(Debug)]
pub(super) struct StagedCommit {
    pub(super) applied: Seq,
    pub(super) state: Option<Vec<u8>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.close() {
            tracing::error!(path = %self.path.display(), error = %e, "closing the journal failed");
        }
    }
}

impl Inner {
    pub(super) fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            path: state_dir(&self.path),
            detail,
        }
    }

    pub(super) fn engine(&self, e: sled::Error) -> Error {
        engine_error(&state_dir(&self.path), e)
    }

    pub(super) fn unseal<'a>(
        &self,
        what: &str,
        raw_key: &[u8],
        record: &'a [u8],
    ) -> Result<&'a [u8]> {
        unseal(record).ok_or_else(|| {
            self.corrupt(format!(
                "checksum mismatch in {what} record {:?}",
                String::from_utf8_lossy(raw_key)
            ))
        })
    }

    /// A sealed big-endian u64 record (owner epochs, replay starts), if present.
    pub(super) fn sealed_u64(&self, what: &str, raw: &[u8]) -> Result<Option<u64>> {
        let Some(v) = self.db.get(raw).map_err(|e| self.engine(e))? else {
            return Ok(None);
        };
        let body = self.unseal(what, raw, &v)?;
        let bytes = body.try_into().map_err(|_| {
            self.corrupt(format!(
                "{what} record {:?} is malformed",
                String::from_utf8_lossy(raw)
            ))
        })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    pub(super) fn open_for_writes(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Stopped { what: "journal" });
        }
        Ok(())
    }

    pub(super) fn staged(&self) -> MutexGuard<'_, HashMap<Arc<str>, StagedCommit>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn snapshot(&self, key: &str) -> Result<Snapshot> {
        if let Some(c) = self.staged().get(key) {
            return Ok(Snapshot {
                applied: c.applied,
                state: c.state.clone(),
            });
        }
        read_snapshot(&self.db, &self.path, key)
    }

    /// The committed seq of `key` (staged or written), without copying its state.
    pub(super) fn applied(&self, key: &str) -> Result<Seq> {
        if let Some(c) = self.staged().get(key) {
            return Ok(c.applied);
        }
        super::read_applied(&self.db, &self.path, key)
    }

    /// Refuses a write of `key` at `epoch` unless this journal holds its range at `epoch`;
    /// otherwise returns the owners' read guard, to hold until the write is done (a release
    /// waits for it, so nothing passes the check and lands after the release).
    pub(super) fn hold_epoch(
        &self,
        key: &str,
        epoch: Epoch,
    ) -> Result<std::sync::RwLockReadGuard<'_, HashMap<u32, Epoch>>> {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        self.check_in(&owners, key, epoch)?;
        Ok(owners)
    }

    fn check_in(&self, owners: &HashMap<u32, Epoch>, key: &str, epoch: Epoch) -> Result<()> {
        let range = range_of(key, self.ranges);
        let current = owners.get(&range.0).copied();
        if current == Some(epoch) {
            return Ok(());
        }
        Err(self.fenced(
            key,
            Fence::StaleEpoch {
                range,
                epoch,
                current,
            },
        ))
    }

    pub(super) fn fenced(&self, key: &str, reason: Fence) -> Error {
        crate::metrics::fenced(&reason);
        tracing::warn!(path = %self.path.display(), key, %reason, "journal write refused");
        Error::Fenced {
            key: key.to_string(),
            reason,
        }
    }

    /// Bumps the owner epochs of `ranges` durably (one flush) and holds them.
    pub(super) fn acquire(&self, ranges: &[KeyRange]) -> Result<Vec<Epoch>> {
        self.open_for_writes()?;
        let mut owners = self.owners.write().unwrap_or_else(|p| p.into_inner());
        let mut write = sled::Batch::default();
        let mut epochs = Vec::with_capacity(ranges.len());
        for &range in ranges {
            if range.0 >= self.ranges {
                return Err(Error::InvalidOption {
                    key: "journal.range",
                    reason: format!("{range} does not exist (the journal has {})", self.ranges),
                });
            }
            let raw = owner_key(range);
            let epoch = self.sealed_u64("owner", &raw)?.unwrap_or(0) + 1;
            write.insert(&raw, crate::codec::seal(&epoch.to_be_bytes()));
            epochs.push(epoch);
        }
        self.db.apply_batch(write).map_err(|e| self.engine(e))?;
        self.db.flush().map_err(|e| self.engine(e))?;
        for (range, epoch) in ranges.iter().zip(&epochs) {
            owners.insert(range.0, *epoch);
        }
        Ok(epochs)
    }

    /// Gives up `range`: staged commits become durable, its payloads leave memory.
    pub(super) fn release(&self, range: KeyRange, epoch: Epoch) -> Result<()> {
        {
            let mut owners = self.owners.write().unwrap_or_else(|p| p.into_inner());
            let current = owners.get(&range.0).copied();
            if current != Some(epoch) {
                return Err(self.fenced(
                    &range.to_string(),
                    Fence::StaleEpoch {
                        range,
                        epoch,
                        current,
                    },
                ));
            }
            owners.remove(&range.0);
        }
        self.flush()?;
        let freed = self
            .inbox
            .forget_payloads(|k| range_of(k, self.ranges) == range);
        tracing::info!(path = %self.path.display(), %range, epoch, freed_bytes = freed, "range released");
        Ok(())
    }

    /// The last sequence number used by `key`.
    pub(super) fn last_seq(
        &self,
        seqs: &mut HashMap<Arc<str>, Seq>,
        key: &Arc<str>,
    ) -> Result<Seq> {
        if let Some(s) = seqs.get(key) {
            return Ok(*s);
        }
        let last = match self.inbox.last_seq(key) {
            Some(s) => s.max(self.applied(key)?),
            None => self.applied(key)?,
        };
        if seqs.len() >= SEQ_CACHE_LIMIT {
            seqs.clear();
        }
        seqs.insert(key.clone(), last);
        Ok(last)
    }

    pub(super) fn seqs(&self) -> MutexGuard<'_, HashMap<Arc<str>, Seq>> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn check_size(&self, key: &str, len: usize) -> Result<()> {
        if len > self.max_message_bytes {
            return Err(Error::TooLarge {
                key: key.to_string(),
                bytes: len,
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }

    pub(super) fn append(&self, batch: &[Append]) -> Result<Vec<Seq>> {
        self.open_for_writes()?;
        // Held until the batch is in the log: see `hold_epoch`.
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        for a in batch {
            super::layout::check_key(&a.key)?;
            self.check_size(&a.key, a.payload.len())?;
            self.check_in(&owners, &a.key, a.epoch)?;
        }
        let mut seqs = self.seqs();
        let mut assigned: HashMap<Arc<str>, Seq> = HashMap::new();
        let mut entries = Vec::with_capacity(batch.len());
        for a in batch {
            let last = match assigned.get(&a.key) {
                Some(s) => *s,
                None => self.last_seq(&mut seqs, &a.key)?,
            };
            assigned.insert(a.key.clone(), last + 1);
            entries.push((a.key.clone(), last + 1, Origin::Send, a.payload.clone()));
        }
        let sync = self.durability == Durability::FlushPerBatch;
        let started = Instant::now();
        let appended = self.inbox.append(&entries, sync)?;
        if sync {
            crate::metrics::journal_flushed(started.elapsed());
        }
        seqs.extend(assigned);
        drop(seqs);
        drop(owners);
        if appended.rolled {
            // A closed segment's length goes into the marker now. The batch is durable either
            // way: a failure here is the journal thread's to retry, not the senders'.
            self.mark_after_roll();
        }
        Ok(entries.iter().map(|e| e.1).collect())
    }

    /// Appends one message moved from elsewhere (a dead letter, a timer), durably.
    pub(super) fn append_moved(
        &self,
        seqs: &mut HashMap<Arc<str>, Seq>,
        key: &Arc<str>,
        origin: Origin,
        payload: Bytes,
    ) -> Result<Seq> {
        let seq = self.last_seq(seqs, key)? + 1;
        let appended = self
            .inbox
            .append(&[(key.clone(), seq, origin, payload)], true)?;
        seqs.insert(key.clone(), seq);
        if appended.rolled {
            self.mark_after_roll();
        }
        Ok(seq)
    }

    /// Writes staged commits to the state store and drops what they acknowledge from the
    /// inbox index. `extra` adds to the same atomic batch and may override staged commits (a
    /// dead letter, a commit with timers). Serialised from the take to the acks: a write
    /// that took older commits can never land after one that took newer ones.
    pub(super) fn write_staged(
        &self,
        extra: impl FnOnce(&mut HashMap<Arc<str>, StagedCommit>, &mut sled::Batch) -> Result<()>,
    ) -> Result<()> {
        let _serial = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // The staged lock is held until the batch is in the state store: a reader never sees
        // a commit neither staged nor written (it would read an older state and skip).
        let mut current = self.staged();
        let mut taken = std::mem::take(&mut *current);
        let mut write = sled::Batch::default();
        let written = extra(&mut taken, &mut write).and_then(|()| {
            for (key, c) in &taken {
                write.insert(
                    key_prefix(STATE, key),
                    state_record(c.applied, c.state.as_deref()),
                );
            }
            self.db.apply_batch(write).map_err(|e| self.engine(e))
        });
        if let Err(e) = written {
            // Nothing written: put back what was taken (no newer commit can have arrived:
            // the lock was held).
            *current = taken;
            return Err(e);
        }
        drop(current);
        for (key, c) in taken {
            self.inbox.ack(&key, c.applied);
        }
        Ok(())
    }

    /// The committed state of `key`, seen from inside [`Inner::write_staged`] (which holds
    /// the staged lock: everything staged is in `taken`).
    pub(super) fn snapshot_in(
        &self,
        taken: &HashMap<Arc<str>, StagedCommit>,
        key: &str,
    ) -> Result<Snapshot> {
        match taken.get(key) {
            Some(c) => Ok(Snapshot {
                applied: c.applied,
                state: c.state.clone(),
            }),
            None => read_snapshot(&self.db, &self.path, key),
        }
    }

    /// Writes staged commits and flushes the state store, then deletes inbox segments that
    /// only held messages acknowledged before this flush.
    pub(super) fn flush(&self) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.write_staged(|_, _| Ok(()))?;
        let emptied = self.inbox.take_emptied();
        let result = self.flush_then_delete(&emptied);
        if result.is_err() {
            // Deleted later, after a flush that works.
            self.inbox.restore_emptied(emptied);
        }
        result
    }

    fn flush_then_delete(&self, emptied: &[u64]) -> Result<()> {
        let next = self.epoch.load(Ordering::Acquire) + 1;
        let (seg, len) = self.inbox.durable_position();
        let mut log = seg.to_be_bytes().to_vec();
        log.extend_from_slice(&len.to_be_bytes());
        let mut write = sled::Batch::default();
        write.insert(EPOCH_KEY, &next.to_be_bytes());
        // The log's durable position rides along: a truncation found at the next open is
        // measured against the newer of this and the marker.
        write.insert(LOG_KEY, log);
        self.db.apply_batch(write).map_err(|e| self.engine(e))?;
        self.db.flush().map_err(|e| self.engine(e))?;
        self.epoch.store(next, Ordering::Release);
        if !emptied.is_empty() {
            // The acknowledgements that emptied them are durable now: the marker must stop
            // listing the segments before they go (every marker written from here on leaves
            // them out).
            self.inbox.begin_delete(emptied);
            self.mark_with(false)?;
            self.inbox.delete(emptied)?;
        }
        Ok(())
    }

    pub(super) fn flush_if_staged(&self) -> Result<()> {
        if self.staged().is_empty() {
            return Ok(());
        }
        self.flush()
    }

    /// Records the durable epoch and the log's segments in the marker file if they moved.
    pub(super) fn mark(&self) -> Result<()> {
        self.mark_with(false)
    }

    pub(super) fn mark_after_roll(&self) {
        if let Err(e) = self.mark() {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record a segment roll in the marker (retried by the journal thread)");
        }
    }

    /// Writes the marker from the log as it is now, read under the marker's lock: markers
    /// are written in the order their contents were read, so a stale one never lands last.
    fn mark_with(&self, clean: bool) -> Result<()> {
        let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Marker {
            epoch: self.epoch.load(Ordering::Acquire).max(marked.epoch),
            log: self.inbox.marks(),
            clean,
        };
        if *marked != now {
            write_marker(&self.path, now.clone())?;
            *marked = now;
        }
        Ok(())
    }

    /// Flushes everything, records a clean close, refuses further writes.
    pub(super) fn close(&self) -> Result<()> {
        self.flush()?;
        self.inbox.sync()?;
        // The next open reads what it can from sidecars (those built while writing: a close
        // never waits for segments to be read).
        self.inbox.write_sidecars(0);
        self.closed.store(true, Ordering::Release);
        self.mark_with(true)
    }

    /// A crash between appending a moved message and removing its source leaves both:
    /// finish the move by removing the source.
    pub(super) fn finish_moves(&self, unfinished: &[(Arc<str>, Origin)]) -> Result<()> {
        if unfinished.is_empty() {
            return Ok(());
        }
        let mut write = sled::Batch::default();
        for (key, origin) in unfinished {
            match origin {
                Origin::Send => {}
                Origin::Redrive { seq } => write.remove(seq_key(DEAD, key, *seq)),
                Origin::Timer { fire_at_ms, id } => {
                    write.remove(timer_key(range_of(key, self.ranges), *fire_at_ms, key, *id))
                }
            }
        }
        self.db.apply_batch(write).map_err(|e| self.engine(e))
    }

    /// Counts one failed delivery of (`key`, `seq`) durably.
    pub(super) fn record_failure(&self, key: &str, seq: Seq) -> Result<u32> {
        let raw_key = key_prefix(FAILURES, key);
        let before = match self.db.get(&raw_key).map_err(|e| self.engine(e))? {
            Some(v) => {
                let body = self.unseal("failure", &raw_key, &v)?;
                let (at, count) = body
                    .split_at_checked(8)
                    .ok_or_else(|| self.corrupt(format!("failure record of {key} is too short")))?;
                let at = u64::from_be_bytes(at.try_into().unwrap_or([0; 8]));
                let count = u32::from_be_bytes(count.try_into().unwrap_or([0; 4]));
                if at == seq { count } else { 0 }
            }
            None => 0,
        };
        let attempts = before.saturating_add(1);
        let mut body = seq.to_be_bytes().to_vec();
        body.extend_from_slice(&attempts.to_be_bytes());
        self.db
            .insert(&raw_key, crate::codec::seal(&body))
            .map_err(|e| self.engine(e))?;
        self.flush()?;
        Ok(attempts)
    }
}
