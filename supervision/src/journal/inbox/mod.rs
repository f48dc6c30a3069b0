//! The inbox: an append-only log of segment files holding every accepted message until its
//! actor acknowledges it, and an in-memory index of the unacknowledged ones.
//!
//! Appends are sequential writes (one write and one fdatasync per group-commit batch);
//! recovery is a sequential read; a segment whose messages are all acknowledged is deleted
//! whole, once the acknowledgements themselves are durable. The index keeps the payload of
//! every unacknowledged message in memory, so replays never read the disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::{Entry, Seq};
use crate::error::{Error, Result};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest record accepted when reading (a damaged length must not allocate gigabytes).
const MAX_RECORD: usize = crate::codec::MAX_RECORD_BYTES;
const HEADER: usize = 8;
/// Recovery reads segments through a buffer of this size.
const READ_BUFFER: usize = 4 * 1024 * 1024;

/// Why a message entered the inbox; recovery uses it to finish an interrupted move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Sent through the registry.
    Send,
    /// Re-driven from the dead letter at this seq.
    Redrive { seq: Seq },
    /// Fired from this timer.
    Timer { fire_at_ms: u64, id: u64 },
}

/// Maps hashed on every message: a fast hasher (keys are ours, not an attacker's choice of
/// collisions; they come from authenticated senders and a per-process random seed).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A message to append: key, seq, origin, payload.
pub(crate) type NewEntry = (Arc<str>, Seq, Origin, Bytes);

/// The durable position of the log: (segment, bytes known durable in it).
pub(crate) type Position = (u64, u64);

#[derive(Debug)]
struct Pending {
    seq: Seq,
    segment: u64,
    payload: Payload,
}

/// Where an unacknowledged message's payload is: in memory (appended by this process) or in
/// its segment (recovered: read back on demand, so that recovery reads the log once, through
/// one small buffer, and holds no payloads).
#[derive(Debug)]
enum Payload {
    Memory(Bytes),
    Disk { offset: u64, len: u32 },
}

#[derive(Debug)]
struct State {
    active: File,
    active_id: u64,
    active_len: u64,
    /// Length of the active segment known to be on disk.
    synced_len: u64,
    /// Unacknowledged messages per segment.
    live: BTreeMap<u64, u64>,
    /// Unacknowledged messages per key, in seq order.
    keys: Map<Arc<str>, VecDeque<Pending>>,
    /// Segments emptied by acknowledgements that are not yet durable.
    emptied: Vec<u64>,
    /// Read handles of recovered segments, for payloads on disk.
    files: Map<u64, Arc<File>>,
}

/// The inbox log. All methods take `&self`; one lock orders appends and acknowledgements.
#[derive(Debug)]
pub(crate) struct Inbox {
    dir: PathBuf,
    state: Mutex<State>,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

fn encode_record(out: &mut Vec<u8>, key: &str, seq: Seq, origin: Origin, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    match origin {
        Origin::Send => out.push(0),
        Origin::Redrive { seq } => {
            out.push(1);
            out.extend_from_slice(&seq.to_le_bytes());
        }
        Origin::Timer { fire_at_ms, id } => {
            out.push(2);
            out.extend_from_slice(&fire_at_ms.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out.extend_from_slice(payload);
    let body = &out[start + HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Record<'a> {
    key: &'a str,
    seq: Seq,
    origin: Origin,
    payload: &'a [u8],
}

fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = body.split_at_checked(n)?;
    *body = rest;
    Some(head)
}

fn u64_of(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn decode_body(mut body: &[u8]) -> Option<Record<'_>> {
    let klen = u16::from_le_bytes(take(&mut body, 2)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(take(&mut body, klen)?).ok()?;
    let seq = u64_of(take(&mut body, 8)?)?;
    let origin = match take(&mut body, 1)?[0] {
        0 => Origin::Send,
        1 => Origin::Redrive {
            seq: u64_of(take(&mut body, 8)?)?,
        },
        2 => Origin::Timer {
            fire_at_ms: u64_of(take(&mut body, 8)?)?,
            id: u64_of(take(&mut body, 8)?)?,
        },
        _ => return None,
    };
    Some(Record {
        key,
        seq,
        origin,
        payload: body,
    })
}

/// What recovery found: unacknowledged messages whose origin must be finished.
pub(crate) type Unfinished = Vec<(Arc<str>, Origin)>;

impl Inbox {
    /// Opens the log in `dir`, reading every segment. `applied` gives each key's committed
    /// seq: older messages are acknowledged and skipped. `durable` is the position the
    /// marker recorded: damage before it is corruption; a bad tail after it is a torn write
    /// of a crash and is cut off.
    pub(crate) fn open(
        dir: &Path,
        durable: Option<Position>,
        mut applied: impl FnMut(&str) -> Result<Seq>,
    ) -> Result<(Self, Unfinished)> {
        let io = |path: &Path, e: std::io::Error| Error::Storage {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse::<u64>().ok()
            })
            .collect();
        ids.sort_unstable();
        if let Some((seg, len)) = durable
            && len > 0
        {
            let path = segment_path(dir, seg);
            let actual = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if actual < len {
                return Err(Error::Corrupt {
                    path,
                    detail: format!(
                        "segment holds {actual} bytes but {len} were durable: data was lost \
                         (truncated or deleted)"
                    ),
                });
            }
        }
        // Per key: its name, its applied seq, its unacknowledged messages.
        let mut recovered: Vec<(Arc<str>, Seq, VecDeque<Pending>)> = Vec::new();
        let mut slot_of: Map<Arc<str>, usize> = Map::default();
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        let mut unfinished = Vec::new();
        let newest = ids.last().copied();
        let mut files: Map<u64, Arc<File>> = Map::default();
        let mut buf = vec![0u8; READ_BUFFER];
        for &id in &ids {
            let path = segment_path(dir, id);
            let file = File::open(&path).map_err(|e| io(&path, e))?;
            let mut count = 0u64;
            let end = scan_segment(&file, &mut buf, |offset, payload_offset, record| {
                let slot = match slot_of.get(record.key) {
                    Some(i) => *i,
                    None => {
                        let k: Arc<str> = Arc::from(record.key);
                        recovered.push((k.clone(), applied(record.key)?, VecDeque::new()));
                        slot_of.insert(k, recovered.len() - 1);
                        recovered.len() - 1
                    }
                };
                let (key, applied_seq, queue) = &mut recovered[slot];
                // A moved message's source is removed after its append: finish that even if
                // the message was handled since (removing a removed source is harmless).
                if record.origin != Origin::Send {
                    unfinished.push((Arc::clone(key), record.origin));
                }
                if record.seq <= *applied_seq {
                    return Ok(());
                }
                if queue.back().is_some_and(|p| p.seq >= record.seq) {
                    return Err(Error::Corrupt {
                        path: path.clone(),
                        detail: format!(
                            "{} seq {} out of order at offset {offset}",
                            record.key, record.seq
                        ),
                    });
                }
                queue.push_back(Pending {
                    seq: record.seq,
                    segment: id,
                    payload: Payload::Disk {
                        offset: payload_offset,
                        len: record.payload.len() as u32,
                    },
                });
                count += 1;
                Ok(())
            })
            .map_err(|e| match e {
                ScanError::Io(e) => io(&path, e),
                ScanError::Record(e) => e,
            })?;
            if let Some(at) = end {
                let durable_here = match durable {
                    Some((seg, len)) if seg == id => at >= len,
                    Some((seg, _)) => id > seg,
                    None => true,
                };
                if Some(id) != newest || !durable_here {
                    return Err(Error::Corrupt {
                        path,
                        detail: format!("damaged record at offset {at}"),
                    });
                }
                let len = file.metadata().map_err(|e| io(&path, e))?.len();
                tracing::warn!(path = %path.display(), offset = at, dropped = len - at, "cutting a torn write at the end of the inbox log");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io(&path, e))?;
                f.set_len(at).map_err(|e| io(&path, e))?;
                f.sync_all().map_err(|e| io(&path, e))?;
            }
            if count > 0 {
                files.insert(id, Arc::new(file));
            }
            live.insert(id, count);
        }
        // Segments with nothing unacknowledged go at the first flush, once the marker names
        // the new active segment.
        let emptied: Vec<u64> = live
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        let keys: Map<Arc<str>, VecDeque<Pending>> = recovered
            .into_iter()
            .filter(|(_, _, q)| !q.is_empty())
            .map(|(k, _, q)| (k, q))
            .collect();
        let active_id = match newest {
            None => 1,
            Some(n) => n.checked_add(1).ok_or_else(|| Error::Corrupt {
                path: segment_path(dir, n),
                detail: "segment number out of range".into(),
            })?,
        };
        let path = segment_path(dir, active_id);
        let active = create_segment(dir, &path)?;
        live.insert(active_id, 0);
        Ok((
            Self {
                dir: dir.to_path_buf(),
                state: Mutex::new(State {
                    active,
                    active_id,
                    active_len: 0,
                    synced_len: 0,
                    live,
                    keys,
                    emptied,
                    files,
                }),
            },
            unfinished,
        ))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self, id: u64, e: std::io::Error) -> Error {
        Error::Storage {
            path: segment_path(&self.dir, id),
            source: Box::new(e),
        }
    }

    /// Appends messages whose seqs the caller assigned (in order per key), syncing them to
    /// disk when `sync` is set.
    pub(crate) fn append(&self, entries: &[NewEntry], sync: bool) -> Result<()> {
        let mut buf = Vec::with_capacity(entries.iter().map(|e| e.0.len() + e.3.len() + 40).sum());
        for (key, seq, origin, payload) in entries {
            encode_record(&mut buf, key, *seq, *origin, payload);
        }
        let mut st = self.state();
        let id = st.active_id;
        let before = st.active_len;
        let written = st
            .active
            .write_all(&buf)
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
        for (key, seq, _, payload) in entries {
            st.keys.entry(key.clone()).or_default().push_back(Pending {
                seq: *seq,
                segment: id,
                payload: Payload::Memory(payload.clone()),
            });
        }
        *st.live.entry(id).or_default() += entries.len() as u64;
        if st.active_len >= SEGMENT_BYTES
            && let Err(e) = self.roll(&mut st)
        {
            // The batch is written and indexed; keep using this segment and retry later.
            tracing::error!(segment = id, error = %e, "cannot start a new inbox segment");
        }
        Ok(())
    }

    /// Closes the active segment (synced) and starts the next one.
    fn roll(&self, st: &mut State) -> Result<()> {
        let old = st.active_id;
        st.active.sync_data().map_err(|e| self.io(old, e))?;
        let id = old.checked_add(1).ok_or_else(|| Error::Corrupt {
            path: segment_path(&self.dir, old),
            detail: "segment number out of range".into(),
        })?;
        st.active = create_segment(&self.dir, &segment_path(&self.dir, id))?;
        st.active_id = id;
        st.active_len = 0;
        st.synced_len = 0;
        st.live.insert(id, 0);
        if st.live.get(&old) == Some(&0) {
            st.emptied.push(old);
        }
        Ok(())
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

    /// The position known durable, for the marker.
    pub(crate) fn durable_position(&self) -> Position {
        let st = self.state();
        (st.active_id, st.synced_len)
    }

    /// The last seq appended for `key` among its unacknowledged messages.
    pub(crate) fn last_seq(&self, key: &str) -> Option<Seq> {
        self.state()
            .keys
            .get(key)
            .and_then(|q| q.back())
            .map(|p| p.seq)
    }

    /// Up to `limit` unacknowledged messages of `key` with `seq >= from`.
    pub(crate) fn pending(&self, key: &str, from: Seq, limit: usize) -> Result<Vec<Entry>> {
        let wanted: Vec<(Seq, Located)> = {
            let st = self.state();
            let Some(q) = st.keys.get(key) else {
                return Ok(Vec::new());
            };
            let start = q.partition_point(|p| p.seq < from);
            q.range(start..)
                .take(limit)
                .map(|p| (p.seq, st.locate(p)))
                .collect()
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
            let Ok(i) = q.binary_search_by_key(&seq, |p| p.seq) else {
                return Ok(None);
            };
            st.locate(&q[i])
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

    /// Keys starting with `prefix` with messages in the index, and their last seq.
    pub(crate) fn keys(&self, prefix: &str) -> Vec<(Arc<str>, Seq)> {
        let st = self.state();
        let mut out: Vec<(Arc<str>, Seq)> = st
            .keys
            .iter()
            .filter(|(k, q)| k.starts_with(prefix) && !q.is_empty())
            .filter_map(|(k, q)| q.back().map(|p| (k.clone(), p.seq)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Drops the messages of `key` up to `upto`, acknowledged by a commit now written to the
    /// state store. Segments this empties are deleted after the next state-store flush.
    pub(crate) fn ack(&self, key: &str, upto: Seq) {
        let mut st = self.state();
        let st = &mut *st;
        let Some(q) = st.keys.get_mut(key) else {
            return;
        };
        while q.front().is_some_and(|p| p.seq <= upto) {
            let Some(p) = q.pop_front() else { break };
            if let Some(n) = st.live.get_mut(&p.segment) {
                *n = n.saturating_sub(1);
                if *n == 0 && p.segment != st.active_id {
                    st.emptied.push(p.segment);
                }
            }
        }
        if q.is_empty() {
            st.keys.remove(key);
        }
    }

    /// Segments emptied so far; delete them with [`Inbox::delete`] once the state store has
    /// flushed the acknowledgements that emptied them.
    pub(crate) fn take_emptied(&self) -> Vec<u64> {
        std::mem::take(&mut self.state().emptied)
    }

    /// Deletes emptied segments.
    pub(crate) fn delete(&self, ids: &[u64]) -> Result<()> {
        let mut st = self.state();
        for &id in ids {
            if st.live.get(&id) == Some(&0) && id != st.active_id {
                let path = segment_path(&self.dir, id);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io(id, e)),
                }
                st.live.remove(&id);
                st.files.remove(&id);
            }
        }
        Ok(())
    }

    /// Gives back emptied segments whose deletion did not happen (a failed flush).
    pub(crate) fn restore_emptied(&self, ids: Vec<u64>) {
        self.state().emptied.extend(ids);
    }

    /// Messages held in memory (unacknowledged), for tests and metrics.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state().keys.values().map(VecDeque::len).sum()
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
    fn locate(&self, p: &Pending) -> Located {
        match &p.payload {
            Payload::Memory(b) => Located::Memory(b.clone()),
            Payload::Disk { offset, len } => match self.files.get(&p.segment) {
                Some(file) => Located::Disk {
                    segment: p.segment,
                    file: file.clone(),
                    offset: *offset,
                    len: *len,
                },
                // Cannot happen: a segment with unacknowledged messages keeps its handle.
                None => Located::Memory(Bytes::new()),
            },
        }
    }
}

enum ScanError {
    Io(std::io::Error),
    Record(Error),
}

/// Reads a segment's records in order through `buf` (grown for a record larger than it),
/// calling `on_record(record offset, payload offset, record)`. Returns the offset of the
/// first torn or damaged record, if any.
fn scan_segment(
    file: &File,
    buf: &mut Vec<u8>,
    mut on_record: impl FnMut(u64, u64, Record<'_>) -> Result<()>,
) -> Result<Option<u64>, ScanError> {
    let mut reader = file;
    let file_len = file.metadata().map_err(ScanError::Io)?.len();
    let mut base = 0u64; // file offset of buf[0]
    let mut filled = 0usize;
    let mut at = 0usize;
    let mut eof = false;
    loop {
        while filled - at >= HEADER {
            let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            if len > MAX_RECORD {
                return Ok(Some(base + at as u64));
            }
            if base + (at + HEADER + len) as u64 > file_len {
                // The record claims more than the file holds: torn (or a damaged length).
                return Ok(Some(base + at as u64));
            }
            if filled - at < HEADER + len {
                if HEADER + len > buf.len() {
                    buf.resize(HEADER + len, 0);
                }
                break;
            }
            let Some((record, next)) = parse_at(&buf[..filled], at) else {
                return Ok(Some(base + at as u64));
            };
            let offset = base + at as u64;
            let payload_offset = base + (next - record.payload.len()) as u64;
            on_record(offset, payload_offset, record).map_err(ScanError::Record)?;
            at = next;
        }
        if eof {
            return Ok((at < filled).then_some(base + at as u64));
        }
        buf.copy_within(at..filled, 0);
        base += at as u64;
        filled -= at;
        at = 0;
        let n = reader.read(&mut buf[filled..]).map_err(ScanError::Io)?;
        if n == 0 {
            eof = true;
        }
        filled += n;
    }
}

fn create_segment(dir: &Path, path: &Path) -> Result<File> {
    let io = |e: std::io::Error| Error::Storage {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    // The new file's directory entry must survive a crash too.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(f)
}

/// Parses the record at `at`; `None` if it is torn or damaged.
fn parse_at(bytes: &[u8], at: usize) -> Option<(Record<'_>, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let body = bytes.get(at + HEADER..at + HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((decode_body(body)?, at + HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(key: &str, seq: Seq, payload: &[u8]) -> NewEntry {
        (
            Arc::from(key),
            seq,
            Origin::Send,
            Bytes::copy_from_slice(payload),
        )
    }

    fn open(dir: &Path, durable: Option<Position>) -> Result<(Inbox, Unfinished)> {
        Inbox::open(dir, durable, |_| Ok(0))
    }

    #[test]
    fn appended_messages_are_recovered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = open(dir.path(), None).unwrap();
        inbox
            .append(
                &[
                    entry("a", 1, b"x"),
                    entry("b", 1, b"y"),
                    entry("a", 2, b"z"),
                ],
                true,
            )
            .unwrap();
        drop(inbox);
        let (inbox, unfinished) = open(dir.path(), None).unwrap();
        assert!(unfinished.is_empty());
        let a = inbox.pending("a", 1, 10).unwrap();
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(&*a[1].payload, b"z");
        assert_eq!(inbox.last_seq("b"), Some(1));
    }

    #[test]
    fn acknowledged_messages_are_skipped_and_empty_segments_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = open(dir.path(), None).unwrap();
        inbox
            .append(&[entry("a", 1, b"x"), entry("a", 2, b"y")], true)
            .unwrap();
        drop(inbox);
        // The state store says a is applied up to 2: nothing is pending, the segment goes.
        let (inbox, _) = Inbox::open(dir.path(), None, |_| Ok(2)).unwrap();
        assert_eq!(inbox.len(), 0);
        let emptied = inbox.take_emptied();
        inbox.delete(&emptied).unwrap();
        assert_eq!(inbox.segments(), 1, "only the new active segment remains");
    }

    #[test]
    fn emptied_segments_wait_for_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = open(dir.path(), None).unwrap();
        inbox.append(&[entry("a", 1, b"x")], true).unwrap();
        {
            let mut st = inbox.state();
            inbox.roll(&mut st).unwrap();
        }
        assert_eq!(inbox.segments(), 2);
        inbox.ack("a", 1);
        let emptied = inbox.take_emptied();
        assert_eq!(emptied.len(), 1);
        assert_eq!(
            inbox.segments(),
            2,
            "not deleted before the acks are durable"
        );
        inbox.delete(&emptied).unwrap();
        assert_eq!(inbox.segments(), 1);
    }

    #[test]
    fn torn_tail_after_the_durable_position_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = open(dir.path(), None).unwrap();
        inbox.append(&[entry("a", 1, b"x")], true).unwrap();
        let pos = inbox.durable_position();
        inbox.append(&[entry("a", 2, b"y")], true).unwrap();
        drop(inbox);
        let path = segment_path(dir.path(), pos.0);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let (inbox, _) = open(dir.path(), Some(pos)).unwrap();
        assert_eq!(inbox.pending("a", 1, 10).unwrap().len(), 1);
    }

    #[test]
    fn damage_before_the_durable_position_is_an_error_naming_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = open(dir.path(), None).unwrap();
        inbox
            .append(&[entry("a", 1, b"xxxxxxxx"), entry("a", 2, b"y")], true)
            .unwrap();
        let pos = inbox.durable_position();
        drop(inbox);
        let path = segment_path(dir.path(), pos.0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[14] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = open(dir.path(), Some(pos)).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn origins_of_unacknowledged_messages_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = open(dir.path(), None).unwrap();
        inbox
            .append(
                &[(
                    Arc::from("a"),
                    1,
                    Origin::Timer {
                        fire_at_ms: 5,
                        id: 9,
                    },
                    Bytes::from_static(b"t"),
                )],
                true,
            )
            .unwrap();
        drop(inbox);
        let (_, unfinished) = open(dir.path(), None).unwrap();
        assert_eq!(
            unfinished,
            vec![(
                Arc::from("a"),
                Origin::Timer {
                    fire_at_ms: 5,
                    id: 9
                }
            )]
        );
    }

    #[test]
    fn scanning_handles_records_across_and_beyond_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let mut bytes = Vec::new();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; i as usize * 7]).collect();
        for (i, p) in payloads.iter().enumerate() {
            encode_record(&mut bytes, "key", i as u64 + 1, Origin::Send, p);
        }
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        // A buffer smaller than most records: every record crosses a refill.
        let mut buf = vec![0u8; 16];
        let mut seen = Vec::new();
        let end = scan_segment(&file, &mut buf, |_, payload_offset, r| {
            let mut read = vec![0u8; r.payload.len()];
            file.read_exact_at(&mut read, payload_offset).unwrap();
            assert_eq!(read, r.payload, "payload offset points at the payload");
            seen.push((r.seq, r.payload.to_vec()));
            Ok(())
        });
        assert!(matches!(end, Ok(None)));
        let expected: Vec<(u64, Vec<u8>)> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as u64 + 1, p))
            .collect();
        assert_eq!(seen, expected);
    }

    proptest! {
        #[test]
        fn parsing_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut at = 0;
            while let Some((_, next)) = parse_at(&bytes, at) {
                prop_assert!(next > at);
                at = next;
            }
        }

        #[test]
        fn records_round_trip(
            key in "[a-z/]{1,20}",
            seq in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut buf = Vec::new();
            encode_record(&mut buf, &key, seq, Origin::Redrive { seq: 3 }, &payload);
            let (r, next) = parse_at(&buf, 0).unwrap();
            prop_assert_eq!(next, buf.len());
            prop_assert_eq!(r.key, key.as_str());
            prop_assert_eq!(r.seq, seq);
            prop_assert_eq!(r.origin, Origin::Redrive { seq: 3 });
            prop_assert_eq!(r.payload, payload.as_slice());
        }
    }
}
