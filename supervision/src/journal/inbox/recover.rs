//! Opening the inbox log: every segment the marker names must be there with the length it
//! names, every record before the durable position must read back, and each key's messages
//! must continue its committed sequence without a gap. The only damage recovery repairs by
//! itself is a torn tail: damage at the very end of the newest segment, after the durable
//! position, with no valid record after it. Everything else is [`Error::Corrupt`] naming the
//! file and offset; `soma journal check` and `salvage` are the operator's tools then.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use super::record::{Origin, READ_BUFFER, next_valid, scan_segment, segment_id, segment_path};
use super::{Inbox, LogMarks, Map, Pending, State, create_segment, sync_dir};
use crate::error::{Error, Result};
use crate::journal::Seq;

/// What recovery found besides the index.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Unacknowledged moved messages whose source (dead letter, timer) must be removed.
    pub(crate) unfinished: Vec<(Arc<str>, Origin)>,
    /// A torn tail cut off the newest segment: (segment, offset, bytes dropped).
    pub(crate) torn: Option<(u64, u64, u64)>,
    /// Messages indexed.
    pub(crate) pending: u64,
}

fn corrupt(path: &Path, detail: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// The segment ids in `dir`, sorted.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| Error::storage(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_id(e.file_name().to_str()?))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// The first of the segments `ids` in `dir` that holds anything.
pub(crate) fn first_with_data(dir: &Path, ids: &[u64]) -> Result<Option<std::path::PathBuf>> {
    for &id in ids {
        let path = segment_path(dir, id);
        if file_len(&path)?.unwrap_or(0) > 0 {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn file_len(path: &Path) -> Result<Option<u64>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::storage(path, e)),
    }
}

/// Which segments to read, checked against the marks; and leftovers of an interrupted
/// deletion (emptied segments the marker no longer lists), deleted once the open succeeds.
fn plan(dir: &Path, marks: &LogMarks, on_disk: &[u64]) -> Result<(Vec<u64>, Vec<u64>)> {
    let Some((active, durable)) = marks.active else {
        // The first open never finished: nothing was ever acknowledged. Segments it left
        // are empty; anything else is not what this journal wrote.
        if let Some(path) = first_with_data(dir, on_disk)? {
            return Err(corrupt(
                &path,
                "segment holds data but the marker records no log: the marker was replaced \
                 or damaged"
                    .into(),
            ));
        }
        return Ok((Vec::new(), on_disk.to_vec()));
    };
    for (&id, &len) in &marks.closed {
        let path = segment_path(dir, id);
        match file_len(&path)? {
            None => {
                return Err(corrupt(
                    &path,
                    format!("segment is missing: the marker lists it as closed with {len} bytes"),
                ));
            }
            Some(actual) if actual != len => {
                return Err(corrupt(
                    &path,
                    format!(
                        "segment holds {actual} bytes but held {len} when it was closed: \
                         {}",
                        if actual < len {
                            "data was lost (truncated)"
                        } else {
                            "it was written to after closing"
                        }
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    let path = segment_path(dir, active);
    match file_len(&path)? {
        None => {
            return Err(corrupt(
                &path,
                format!(
                    "segment is missing: the marker names it as the active segment with \
                     {durable} durable bytes"
                ),
            ));
        }
        Some(actual) if actual < durable => {
            return Err(corrupt(
                &path,
                format!(
                    "segment holds {actual} bytes but {durable} were durable: data was lost \
                     (truncated)"
                ),
            ));
        }
        Some(_) => {}
    }
    let mut read: Vec<u64> = marks.closed.keys().copied().collect();
    read.push(active);
    let mut leftovers = Vec::new();
    let mut expected = active + 1;
    for &id in on_disk {
        if id < active {
            if !marks.closed.contains_key(&id) {
                leftovers.push(id);
            }
        } else if id > active {
            // Segments started after the marker was last written: they must follow on.
            if id != expected {
                return Err(corrupt(
                    &segment_path(dir, expected),
                    format!("segment is missing: segment {id} exists, the log has a hole"),
                ));
            }
            read.push(id);
            expected += 1;
        }
    }
    Ok((read, leftovers))
}

/// Records handed from the reading thread to the indexing one, in log order.
enum Scanned {
    /// Whole, checked records of the segment being read.
    Records(Batch),
    /// The segment was read to its end; `damaged` is the offset of its first unreadable
    /// record, if any (what [`scan_segment`] returns).
    End { damaged: Option<u64> },
    /// Reading failed.
    Failed(Error),
}

/// Up to [`BATCH`] records. The reader numbers keys in the order it first meets them;
/// `new_keys` are the keys first met in this batch, in that order.
#[derive(Default)]
struct Batch {
    new_keys: Vec<Arc<str>>,
    records: Vec<Meta>,
}

struct Meta {
    /// The record's key, by number.
    slot: u32,
    seq: Seq,
    origin: Origin,
    offset: u64,
    payload_offset: u64,
    len: u32,
}

const BATCH: usize = 4096;
/// Batches in flight between the two threads.
const BATCHES: usize = 32;

/// The reading half of recovery, on its own thread: reads each segment of `read` in order,
/// checks every record's checksum and sends what it found. It stops when the indexing half
/// hangs up (an error there).
fn read_segments(dir: &Path, read: &[u64], tx: SyncSender<Scanned>, spare: Receiver<Batch>) {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut slot_of: Map<Arc<str>, u32> = Map::default();
    for &id in read {
        let path = segment_path(dir, id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                let _ = tx.send(Scanned::Failed(Error::storage(&path, e)));
                return;
            }
        };
        let mut batch = fresh(&spare);
        let mut hung_up = false;
        let end = scan_segment(&file, &mut buf, |offset, payload_offset, record| {
            let slot = match slot_of.get(record.key) {
                Some(slot) => *slot,
                None => {
                    let slot = u32::try_from(slot_of.len()).map_err(|_| {
                        corrupt(&path, "more than 2^32 keys in the log".to_string())
                    })?;
                    let key: Arc<str> = Arc::from(record.key);
                    slot_of.insert(key.clone(), slot);
                    batch.new_keys.push(key);
                    slot
                }
            };
            batch.records.push(Meta {
                slot,
                seq: record.seq,
                origin: record.origin,
                offset,
                payload_offset,
                len: record.payload.len() as u32,
            });
            if batch.records.len() == BATCH
                && tx
                    .send(Scanned::Records(std::mem::replace(
                        &mut batch,
                        fresh(&spare),
                    )))
                    .is_err()
            {
                hung_up = true;
                return Err(Error::Stopped {
                    what: "journal recovery",
                });
            }
            Ok(())
        });
        if hung_up {
            return;
        }
        let last = match end {
            Ok(damaged) => {
                if !batch.records.is_empty() && tx.send(Scanned::Records(batch)).is_err() {
                    return;
                }
                Scanned::End { damaged }
            }
            Err(e) => Scanned::Failed(e.at(&path)),
        };
        if tx.send(last).is_err() {
            return;
        }
    }
}

/// An empty batch: one the indexer is done with, or a new one.
fn fresh(spare: &Receiver<Batch>) -> Batch {
    let mut batch = spare.try_recv().unwrap_or_default();
    batch.new_keys.clear();
    batch.records.clear();
    batch
}

/// Per key while indexing.
struct KeyScan {
    key: Arc<str>,
    /// Its committed seq: older messages are acknowledged.
    applied: Seq,
    /// The seq its next unacknowledged message must have.
    next: Seq,
    queue: VecDeque<Pending>,
}

/// The indexing half of recovery: every key's unacknowledged messages, in order, with no
/// gap after its committed seq.
struct Index<F> {
    applied: F,
    keys: Vec<KeyScan>,
    unfinished: Vec<(Arc<str>, Origin)>,
    /// Whether the queues were sized for the whole log yet (see [`Index::presize`]).
    presized: bool,
}

/// The queues are sized once this share of the log (1/n) has been indexed.
const PRESIZE_AFTER: u64 = 16;

impl<F: FnMut(&str) -> Result<Seq>> Index<F> {
    /// Indexes one record of segment `id`; true if it is unacknowledged.
    fn add(&mut self, path: &Path, id: u64, m: &Meta) -> Result<bool> {
        let Some(scan) = self.keys.get_mut(m.slot as usize) else {
            return Err(corrupt(
                path,
                format!("record at offset {} names no key", m.offset),
            ));
        };
        // A moved message's source is removed after its append: finish that even if the
        // message was handled since (removing a removed source is harmless).
        if m.origin != Origin::Send {
            self.unfinished.push((Arc::clone(&scan.key), m.origin));
        }
        if m.seq <= scan.applied {
            return Ok(false);
        }
        let expected = scan.next;
        if m.seq != expected {
            let (seq, offset, key) = (m.seq, m.offset, &scan.key);
            let detail = if seq > expected {
                format!(
                    "key {key:?}: seq {seq} at offset {offset} follows {}: messages \
                     {expected}..={} are missing",
                    expected - 1,
                    seq - 1
                )
            } else {
                format!(
                    "key {key:?}: seq {seq} at offset {offset} is out of order (expected \
                     {expected})"
                )
            };
            return Err(corrupt(path, detail));
        }
        scan.next = expected + 1;
        scan.queue.push_back(Pending {
            seq: m.seq,
            segment: id,
            offset: m.payload_offset,
            len: m.len,
            memory: None,
        });
        Ok(true)
    }

    /// Sizes every key's queue for the whole log once `done` of its `total` bytes are
    /// indexed, assuming the rest holds keys in the same proportions: one allocation per key
    /// instead of a queue that doubles (and copies) its way up, which with many keys is much
    /// of the indexer's time. A key that turns out to have more grows as before.
    fn presize(&mut self, done: u64, total: u64) {
        if self.presized || done == 0 || done.saturating_mul(PRESIZE_AFTER) < total {
            return;
        }
        self.presized = true;
        let factor = total as f64 / done as f64;
        for scan in &mut self.keys {
            let expected = (scan.queue.len() as f64 * factor * 1.05) as usize;
            scan.queue
                .reserve_exact(expected.saturating_sub(scan.queue.len()));
        }
    }

    /// Indexes a batch of segment `id`.
    fn add_batch(&mut self, path: &Path, id: u64, batch: &Batch) -> Result<u64> {
        for key in &batch.new_keys {
            let applied = (self.applied)(key)?;
            self.keys.push(KeyScan {
                key: key.clone(),
                applied,
                next: applied + 1,
                queue: VecDeque::new(),
            });
        }
        let mut count = 0;
        for m in &batch.records {
            if self.add(path, id, m)? {
                count += 1;
            }
        }
        Ok(count)
    }
}

/// What the per-segment half of recovery leaves.
struct Segments {
    files: Map<u64, Arc<File>>,
    live: BTreeMap<u64, u64>,
    closed: BTreeMap<u64, u64>,
    torn: Option<(u64, u64, u64)>,
    pending: u64,
}

impl Inbox {
    /// Opens the log in `dir`, reading every live segment. `applied` gives each key's
    /// committed seq: older messages are acknowledged and skipped. `marks` is what the marker
    /// recorded (see [`LogMarks`]).
    ///
    /// One thread reads the segments and checks their records while this one indexes them:
    /// recovery time is what the slower half takes, not the sum.
    pub(crate) fn open(
        dir: &Path,
        marks: &LogMarks,
        segment_bytes: u64,
        mut applied: impl FnMut(&str) -> Result<Seq>,
    ) -> Result<(Self, Recovered)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::storage(dir, e))?;
        let on_disk = list_segments(dir)?;
        let (read, leftovers) = plan(dir, marks, &on_disk)?;
        // The newest segment holding anything: an empty one after it is a roll that failed
        // half-way (or was never written to), not what a torn tail can be in.
        // Each segment to read with its length now (a stat once, for both uses below).
        let mut sized = Vec::with_capacity(read.len());
        for &id in &read {
            sized.push((id, file_len(&segment_path(dir, id))?.unwrap_or(0)));
        }
        let newest = sized
            .iter()
            .rev()
            .find(|(_, len)| *len > 0)
            .map(|(id, _)| *id)
            .or(read.last().copied());
        let mut index = Index {
            applied: &mut applied,
            keys: Vec::new(),
            unfinished: Vec::new(),
            presized: false,
        };
        let (tx, rx) = mpsc::sync_channel(BATCHES);
        let (spare_tx, spare_rx) = mpsc::channel();
        let segments = std::thread::scope(|s| {
            let reader = std::thread::Builder::new()
                .name("soma-journal-recovery".into())
                .spawn_scoped(s, || read_segments(dir, &read, tx, spare_rx))
                .map_err(|e| Error::storage(dir, e))?;
            // `rx` is dropped when indexing ends, so that a reader blocked on a full channel
            // sees the hang-up and the scope can join it.
            let segments = index_segments(dir, &sized, newest, marks, &mut index, rx, spare_tx);
            let _ = reader.join();
            segments
        })?;
        let Segments {
            files,
            mut live,
            closed,
            torn,
            pending,
        } = segments;
        let report = Recovered {
            unfinished: index.unfinished,
            torn,
            pending,
        };
        // Segments with nothing unacknowledged go at the first flush, once the marker names
        // the new active segment.
        let emptied: Vec<u64> = live
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        let keys: Map<Arc<str>, VecDeque<Pending>> = index
            .keys
            .into_iter()
            .filter(|s| !s.queue.is_empty())
            .map(|s| (s.key, s.queue))
            .collect();
        let last = newest.max(on_disk.last().copied());
        let active_id = match last {
            None => 1,
            Some(n) => n.checked_add(1).ok_or_else(|| {
                corrupt(&segment_path(dir, n), "segment number out of range".into())
            })?,
        };
        let active = create_segment(dir, &segment_path(dir, active_id))?;
        live.insert(active_id, 0);
        let mut buf = vec![0u8; 64 * 1024];
        for id in &leftovers {
            let path = segment_path(dir, *id);
            // The marker stopped listing it because every message in it was acknowledged:
            // check that before removing it, rather than trust it.
            let file = File::open(&path).map_err(|e| Error::storage(&path, e))?;
            scan_segment(&file, &mut buf, |offset, _, record| {
                if record.seq > applied(record.key)? {
                    return Err(corrupt(
                        &path,
                        format!(
                            "segment is not listed by the marker but holds {:?} seq {} at \
                             offset {offset}, which is not acknowledged",
                            record.key, record.seq
                        ),
                    ));
                }
                Ok(())
            })
            .map_err(|e| e.at(&path))?;
            tracing::info!(path = %path.display(), "removing an emptied segment whose deletion was interrupted");
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::storage(&path, e)),
            }
        }
        if !leftovers.is_empty() {
            sync_dir(dir)?;
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segment_bytes,
                state: Mutex::new(State {
                    active,
                    active_id,
                    active_len: 0,
                    synced_len: 0,
                    closed,
                    live,
                    keys,
                    emptied,
                    files,
                    memory_bytes: 0,
                    deleting: Default::default(),
                }),
            },
            report,
        ))
    }
}

/// Indexes what the reader sends, segment by segment of `read` (id, length at open): each
/// segment's damage is checked (only a torn tail is cut), and its file made durable.
fn index_segments<F: FnMut(&str) -> Result<Seq>>(
    dir: &Path,
    read: &[(u64, u64)],
    newest: Option<u64>,
    marks: &LogMarks,
    index: &mut Index<F>,
    rx: Receiver<Scanned>,
    spare: Sender<Batch>,
) -> Result<Segments> {
    let mut out = Segments {
        files: Map::default(),
        live: BTreeMap::new(),
        closed: BTreeMap::new(),
        torn: None,
        pending: 0,
    };
    let total: u64 = read.iter().map(|(_, len)| len).sum();
    let mut before = 0u64;
    for &(id, length) in read {
        let path = segment_path(dir, id);
        let mut count = 0u64;
        let damaged = loop {
            match rx.recv() {
                Ok(Scanned::Records(batch)) => {
                    count += index.add_batch(&path, id, &batch)?;
                    if let Some(last) = batch.records.last() {
                        index.presize(before + last.offset, total);
                    }
                    let _ = spare.send(batch);
                }
                Ok(Scanned::End { damaged }) => break damaged,
                Ok(Scanned::Failed(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::storage(
                        &path,
                        std::io::Error::other("the recovery reader ended before this segment"),
                    ));
                }
            }
        };
        let file = File::open(&path).map_err(|e| Error::storage(&path, e))?;
        let len = file.metadata().map_err(|e| Error::storage(&path, e))?.len();
        let mut kept = len;
        if let Some(at) = damaged {
            check_torn(&path, &file, id, at, len, newest, marks)?;
            tracing::warn!(path = %path.display(), offset = at, dropped = len - at, "cutting a torn write at the end of the inbox log");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::storage(&path, e))?;
            f.set_len(at).map_err(|e| Error::storage(&path, e))?;
            out.torn = Some((id, at, len - at));
            kept = at;
        }
        // What a killed process wrote may still be only in the page cache: make it
        // durable before anything is built on it.
        file.sync_data().map_err(|e| Error::storage(&path, e))?;
        out.pending += count;
        out.files.insert(id, Arc::new(file));
        out.live.insert(id, count);
        out.closed.insert(id, kept);
        before += length;
    }
    Ok(out)
}

/// Damage at `at` in segment `id` may be cut only if it is a torn tail: in the newest
/// segment, after its durable position, with no valid record after it.
fn check_torn(
    path: &Path,
    file: &File,
    id: u64,
    at: u64,
    len: u64,
    newest: Option<u64>,
    marks: &LogMarks,
) -> Result<()> {
    if Some(id) != newest {
        return Err(corrupt(
            path,
            format!(
                "damaged record at offset {at} in a closed segment (a crash only tears the \
                 end of the newest one)"
            ),
        ));
    }
    if let Some((active, durable)) = marks.active
        && active == id
        && at < durable
    {
        return Err(corrupt(
            path,
            format!("damaged record at offset {at}, before the durable length {durable}"),
        ));
    }
    let mut rest = vec![0u8; (len - at) as usize];
    file.read_exact_at(&mut rest, at)
        .map_err(|e| Error::storage(path, e))?;
    if let Some(valid) = next_valid(&rest, 1) {
        return Err(corrupt(
            path,
            format!(
                "damaged record at offset {at} followed by a valid record at offset {}: not a \
                 torn write",
                at + valid as u64
            ),
        ));
    }
    Ok(())
}
