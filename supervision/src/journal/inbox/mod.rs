//! The inbox: an append-only log of segment files holding every accepted message until its
//! actor acknowledges it, and an in-memory index of the unacknowledged ones.
//!
//! Appends are sequential writes (one write and one fdatasync per group-commit batch);
//! recovery is a sequential read (`recover`); a segment whose messages are all acknowledged
//! is deleted whole, once the acknowledgements themselves are durable. The index keeps the
//! payload of every message appended by this process in memory (until its key range is
//! released), so replays rarely read the disk.
//!
//! What the log must be is checkable: the marker records every closed segment's final length
//! and the active segment's durable length (see [`LogMarks`]), so that a missing, shortened or
//! damaged segment is told apart from the torn tail a crash leaves.

mod plan;
mod queue;
pub(crate) mod record;
mod recover;
mod sidecar;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use self::queue::{Pending, Queue, Slot};
use self::record::{Origin, encode_record, segment_path};
use super::{Entry, Seq};
use crate::error::{Error, Result};

pub(crate) use self::plan::{first_with_data, list_segments};

/// The segment ids in `dir`, none if it does not exist.
pub(crate) fn list_segments_if_any(dir: &Path) -> Result<Vec<u64>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    list_segments(dir)
}

/// A segment is closed and a new one started past this size (by default).
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Maps hashed on every message: a fast hasher (keys are ours, not an attacker's choice of
/// collisions; they come from authenticated senders and a per-process random seed).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A message to append: key, seq, origin, payload.
pub(crate) type NewEntry = (Arc<str>, Seq, Origin, Bytes);

/// The durable position of the log: (segment, bytes known durable in it).
pub(crate) type Position = (u64, u64);

/// What the marker records about the log: the active segment's durable position and the
/// final length of every closed segment that is still live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LogMarks {
    /// The active segment and how much of it is durable; `None` before the first open
    /// finished.
    pub(crate) active: Option<Position>,
    /// Closed live segments and their final lengths.
    pub(crate) closed: BTreeMap<u64, u64>,
}

#[derive(Debug)]
struct State {
    active: File,
    active_id: u64,
    active_len: u64,
    /// Length of the active segment known to be on disk.
    synced_len: u64,
    /// Closed segments still live and their final lengths.
    closed: BTreeMap<u64, u64>,
    /// Unacknowledged messages per segment.
    live: BTreeMap<u64, u64>,
    /// Unacknowledged messages per key, in seq order.
    keys: Map<Arc<str>, Queue>,
    /// Segments emptied by acknowledgements that are not yet durable.
    emptied: Vec<u64>,
    /// Read handles of segments, for payloads not in memory.
    files: Map<u64, Arc<File>>,
    /// Bytes of payloads held in memory.
    memory_bytes: u64,
    /// Emptied segments about to be deleted: markers no longer list them.
    deleting: std::collections::BTreeSet<u64>,
    /// Closed segments whose sidecar is to be built from the segment (read at open).
    unindexed: Vec<u64>,
    /// The active segment's sidecar, built as it is written.
    building: sidecar::Builder,
    /// Sidecars of closed segments built as they were written, to be written out.
    ready: Vec<(u64, sidecar::Sidecar)>,
}

/// The inbox log. All methods take `&self`; one lock orders appends and acknowledgements.
#[derive(Debug)]
pub(crate) struct Inbox {
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<State>,
}

/// What an append did besides appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// A segment was closed and a new one started: the marker must record it now.
    pub(crate) rolled: bool,
}

fn create_segment(dir: &Path, path: &Path) -> Result<File> {
    let io = |e: std::io::Error| Error::storage(path, e);
    // Written at explicit offsets (not `O_APPEND`): a batch always lands where the index
    // says, even after a failed write whose cut-back failed too.
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    // The new file's directory entry must survive a crash too.
    sync_dir(dir)?;
    Ok(f)
}

/// Damage found in the file at `path`.
fn corrupt(path: &Path, detail: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// fsyncs a directory, so that a rename, creation or deletion in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::storage(dir, e))
}

impl Inbox {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self, id: u64, e: std::io::Error) -> Error {
        Error::storage(&segment_path(&self.dir, id), e)
    }

    /// Appends messages whose seqs the caller assigned (in order per key), syncing them to
    /// disk when `sync` is set.
    pub(crate) fn append(&self, entries: &[NewEntry], sync: bool) -> Result<Appended> {
        let mut buf = Vec::with_capacity(entries.iter().map(|e| e.0.len() + e.3.len() + 40).sum());
        let mut at = Vec::with_capacity(entries.len());
        for (key, seq, origin, payload) in entries {
            at.push(encode_record(&mut buf, key, *seq, *origin, payload) as u64);
        }
        // The sidecar's CRC of the batch, outside the lock.
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf);
        let mut st = self.state();
        let id = st.active_id;
        let before = st.active_len;
        let written = st
            .active
            .write_all_at(&buf, before)
            .and_then(|()| if sync { st.active.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // Nothing of a failed batch may stay: cut the file back. (After a failed fsync the
            // kernel may have dropped the pages anyway; the senders were told it failed.)
            if let Err(cut) = st.active.set_len(before) {
                tracing::error!(segment = id, error = %cut, "cannot cut a failed append off the inbox log");
            }
            return Err(self.io(id, e));
        }
        st.active_len += buf.len() as u64;
        if sync {
            st.synced_len = st.active_len;
        }
        st.building.bytes(&crc);
        for ((key, seq, origin, payload), offset) in entries.iter().zip(at.iter()) {
            st.building.record(
                key,
                || key.clone(),
                *seq,
                *origin,
                before + offset,
                payload.len(),
            );
        }
        for ((key, seq, _, payload), offset) in entries.iter().zip(at) {
            st.memory_bytes += payload.len() as u64;
            st.keys.entry(key.clone()).or_default().push_back(Pending {
                seq: *seq,
                segment: id,
                offset: before + offset,
                len: payload.len() as u32,
                memory: Some(Box::new(payload.clone())),
            });
        }
        *st.live.entry(id).or_default() += entries.len() as u64;
        let mut rolled = false;
        if st.active_len >= self.segment_bytes {
            match self.roll(&mut st) {
                Ok(()) => rolled = true,
                // The batch is written and indexed; keep using this segment and retry later.
                Err(e) => {
                    tracing::error!(segment = id, error = %e, "cannot start a new inbox segment")
                }
            }
        }
        Ok(Appended { rolled })
    }

    /// Closes the active segment now if it holds anything; true if it did.
    pub(crate) fn roll_now(&self) -> Result<bool> {
        let mut st = self.state();
        if st.active_len == 0 {
            return Ok(false);
        }
        self.roll(&mut st)?;
        Ok(true)
    }

    /// Closes the active segment (synced) and starts the next one.
    fn roll(&self, st: &mut State) -> Result<()> {
        let old = st.active_id;
        // Whatever a failed write left past the indexed end goes (a no-op otherwise): a
        // closed segment is exactly as long as the marker will say.
        st.active
            .set_len(st.active_len)
            .and_then(|()| st.active.sync_data())
            .map_err(|e| self.io(old, e))?;
        let id = old.checked_add(1).ok_or_else(|| Error::Corrupt {
            path: segment_path(&self.dir, old),
            detail: "segment number out of range".into(),
        })?;
        let path = segment_path(&self.dir, id);
        let next = create_segment(&self.dir, &path)?;
        // The closed segment stays readable for payloads not held in memory.
        let reader = File::open(segment_path(&self.dir, old)).map_err(|e| self.io(old, e))?;
        st.files.insert(old, Arc::new(reader));
        st.closed.insert(old, st.active_len);
        st.active = next;
        st.active_id = id;
        st.active_len = 0;
        st.synced_len = 0;
        st.live.insert(id, 0);
        let built = std::mem::take(&mut st.building).finish(st.closed[&old]);
        if st.live.get(&old) == Some(&0) {
            st.emptied.push(old);
        } else if let Some(sidecar) = built {
            st.ready.push((old, sidecar));
        }
        Ok(())
    }

    /// Writes the sidecars of closed segments that have none yet (the journal thread does,
    /// off the append path); a failure only costs a slower open, and is logged.
    ///
    /// Sidecars built while writing are written out; of the segments that need a read to
    /// build one, at most `builds` are read (the journal thread reads one per tick, so its
    /// other work never waits for a whole log).
    pub(crate) fn write_sidecars(&self, builds: usize) {
        let (ready, ids) = {
            let mut st = self.state();
            let n = st.unindexed.len().min(builds);
            (
                std::mem::take(&mut st.ready),
                st.unindexed.drain(..n).collect::<Vec<_>>(),
            )
        };
        for (id, built) in ready {
            self.publish_sidecar(id, &built);
        }
        for id in ids {
            if !self.state().closed.contains_key(&id) {
                continue;
            }
            let built = match sidecar::Sidecar::build(&self.dir, id) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                // Deleted meanwhile.
                Err(_) if !self.state().closed.contains_key(&id) => continue,
                Err(e) => {
                    tracing::warn!(segment = id, error = %e, "cannot index a closed segment");
                    continue;
                }
            };
            self.publish_sidecar(id, &built);
        }
    }

    /// Writes the sidecar of closed segment `id`, renamed into place only while the segment
    /// is still there (a deletion holds the same lock and removes the sidecar with it).
    fn publish_sidecar(&self, id: u64, built: &sidecar::Sidecar) {
        let written = built.write(&self.dir, id, |rename| {
            let st = self.state();
            st.closed.contains_key(&id)
                && match rename() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(segment = id, error = %e, "cannot put the index file of a closed segment in place");
                        false
                    }
                }
        });
        if let Err(e) = written {
            tracing::warn!(segment = id, error = %e, "cannot write the index file of a closed segment");
        }
    }

    /// Makes every append durable (periodic durability, close).
    pub(crate) fn sync(&self) -> Result<()> {
        let mut st = self.state();
        if st.synced_len != st.active_len {
            let id = st.active_id;
            st.active.sync_data().map_err(|e| self.io(id, e))?;
            st.synced_len = st.active_len;
        }
        Ok(())
    }

    /// What the marker must record: the durable position and the closed live segments.
    pub(crate) fn marks(&self) -> LogMarks {
        let st = self.state();
        LogMarks {
            active: Some((st.active_id, st.synced_len)),
            closed: st
                .closed
                .iter()
                .filter(|(id, _)| !st.deleting.contains(id))
                .map(|(id, len)| (*id, *len))
                .collect(),
        }
    }

    /// The position known durable.
    pub(crate) fn durable_position(&self) -> Position {
        let st = self.state();
        (st.active_id, st.synced_len)
    }

    /// The last seq appended for `key` among its unacknowledged messages.
    pub(crate) fn last_seq(&self, key: &str) -> Option<Seq> {
        self.state().keys.get(key).and_then(Queue::back_seq)
    }

    /// Like [`Inbox::pending`], if every payload wanted is in memory (no disk read);
    /// `None` otherwise.
    pub(crate) fn pending_in_memory(
        &self,
        key: &str,
        from: Seq,
        limit: usize,
    ) -> Option<Vec<Entry>> {
        let st = self.state();
        let Some(q) = st.keys.get(key) else {
            return Some(Vec::new());
        };
        q.from(from)
            .take(limit)
            .map(|p| {
                p.memory.map(|b| Entry {
                    seq: p.seq,
                    payload: Bytes::clone(b),
                })
            })
            .collect()
    }

    /// Up to `limit` unacknowledged messages of `key` with `seq >= from`.
    pub(crate) fn pending(&self, key: &str, from: Seq, limit: usize) -> Result<Vec<Entry>> {
        let wanted: Vec<(Seq, Located)> = {
            let st = self.state();
            let Some(q) = st.keys.get(key) else {
                return Ok(Vec::new());
            };
            q.from(from)
                .take(limit)
                .map(|p| Ok((p.seq, st.locate(&self.dir, p)?)))
                .collect::<Result<_>>()?
        };
        // Reads from disk happen outside the lock.
        wanted
            .into_iter()
            .map(|(seq, at)| {
                Ok(Entry {
                    seq,
                    payload: self.read(at)?,
                })
            })
            .collect()
    }

    /// The payload of one unacknowledged message.
    pub(crate) fn payload(&self, key: &str, seq: Seq) -> Result<Option<Bytes>> {
        let at = {
            let st = self.state();
            let Some(q) = st.keys.get(key) else {
                return Ok(None);
            };
            let Some(p) = q.get(seq) else {
                return Ok(None);
            };
            st.locate(&self.dir, p)?
        };
        self.read(at).map(Some)
    }

    fn read(&self, at: Located) -> Result<Bytes> {
        match at {
            Located::Memory(b) => Ok(b),
            Located::Disk {
                segment,
                file,
                offset,
                len,
            } => {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| self.io(segment, e))?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// Keys for which `wanted` holds with messages in the index, and their last seq.
    pub(crate) fn keys(&self, wanted: impl Fn(&str) -> bool) -> Vec<(Arc<str>, Seq)> {
        let st = self.state();
        let mut out: Vec<(Arc<str>, Seq)> = st
            .keys
            .iter()
            .filter(|(k, q)| wanted(k) && !q.is_empty())
            .filter_map(|(k, q)| q.back_seq().map(|seq| (k.clone(), seq)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Drops the in-memory payloads of the keys for which `released` holds: they are read
    /// back from their segment when needed. Returns the bytes freed.
    pub(crate) fn forget_payloads(&self, released: impl Fn(&str) -> bool) -> u64 {
        let mut st = self.state();
        let st = &mut *st;
        let mut freed = 0;
        for (key, q) in st.keys.iter_mut() {
            if !released(key) {
                continue;
            }
            freed += q.forget_memory();
        }
        st.memory_bytes -= freed.min(st.memory_bytes);
        freed
    }

    /// Bytes of payloads held in memory.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.state().memory_bytes
    }

    /// Drops the messages of `key` up to `upto`, acknowledged by a commit now written to the
    /// state store. Segments this empties are deleted after the next state-store flush.
    pub(crate) fn ack(&self, key: &str, upto: Seq) {
        let mut st = self.state();
        let st = &mut *st;
        let Some(q) = st.keys.get_mut(key) else {
            return;
        };
        let (live, emptied, active_id) = (&mut st.live, &mut st.emptied, st.active_id);
        let mut freed = 0;
        q.pop_upto(upto, |segment, count, bytes| {
            freed += bytes;
            if let Some(n) = live.get_mut(&segment) {
                let before = *n;
                *n = n.saturating_sub(count);
                if before > 0 && *n == 0 && segment != active_id {
                    emptied.push(segment);
                }
            }
        });
        st.memory_bytes = st.memory_bytes.saturating_sub(freed);
        if q.is_empty() {
            st.keys.remove(key);
        }
    }

    /// Segments emptied so far; delete them with [`Inbox::delete`] once the state store has
    /// flushed the acknowledgements that emptied them and the marker no longer lists them
    /// (see [`Inbox::marks_without`]).
    pub(crate) fn take_emptied(&self) -> Vec<u64> {
        std::mem::take(&mut self.state().emptied)
    }

    /// Markers leave `ids` out from now on: their acknowledgements are durable and they are
    /// about to be deleted.
    pub(crate) fn begin_delete(&self, ids: &[u64]) {
        self.state().deleting.extend(ids.iter().copied());
    }

    /// The marks as they will be once `ids` are deleted.
    #[cfg(test)]
    pub(crate) fn marks_without(&self, ids: &[u64]) -> LogMarks {
        let mut marks = self.marks();
        for id in ids {
            marks.closed.remove(id);
        }
        marks
    }

    /// Deletes emptied segments.
    pub(crate) fn delete(&self, ids: &[u64]) -> Result<()> {
        let mut st = self.state();
        let mut deleted = false;
        for &id in ids {
            if st.live.get(&id) == Some(&0) && id != st.active_id {
                let path = segment_path(&self.dir, id);
                sidecar::remove(&self.dir, id);
                match std::fs::remove_file(&path) {
                    Ok(()) => deleted = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io(id, e)),
                }
                st.live.remove(&id);
                st.closed.remove(&id);
                st.files.remove(&id);
            }
            st.deleting.remove(&id);
        }
        drop(st);
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Gives back emptied segments whose deletion did not happen (a failed flush).
    pub(crate) fn restore_emptied(&self, ids: Vec<u64>) {
        let mut st = self.state();
        for id in &ids {
            st.deleting.remove(id);
        }
        st.emptied.extend(ids);
    }

    /// Messages held in the index (unacknowledged), for tests and metrics.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state().keys.values().map(Queue::len).sum()
    }

    /// Segment files on disk, for tests.
    #[cfg(test)]
    pub(crate) fn segments(&self) -> usize {
        self.state().live.len()
    }
}

/// Where to read a payload from, resolved under the lock, read outside it.
enum Located {
    Memory(Bytes),
    Disk {
        segment: u64,
        file: Arc<File>,
        offset: u64,
        len: u32,
    },
}

impl State {
    fn locate(&self, dir: &Path, p: Slot<'_>) -> Result<Located> {
        if let Some(b) = p.memory {
            return Ok(Located::Memory(Bytes::clone(b)));
        }
        let file = match self.files.get(&p.segment) {
            Some(file) => file.clone(),
            None if p.segment == self.active_id => {
                // The active segment's payloads were dropped from memory (a released range):
                // read them through a fresh handle.
                let path = segment_path(dir, p.segment);
                Arc::new(File::open(&path).map_err(|e| Error::storage(&path, e))?)
            }
            None => {
                return Err(Error::Corrupt {
                    path: segment_path(dir, p.segment),
                    detail: format!("seq {} is indexed in a segment that is not open", p.seq),
                });
            }
        };
        Ok(Located::Disk {
            segment: p.segment,
            file,
            offset: p.offset,
            len: p.len,
        })
    }
}
