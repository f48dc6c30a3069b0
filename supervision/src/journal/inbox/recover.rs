//! Opening the inbox log: every segment the marker names must be there with the length it
//! names, every record before the durable position must read back, and each key's messages
//! must continue its committed sequence without a gap. The only damage recovery repairs by
//! itself is a torn tail: damage at the very end of the newest segment, after the durable
//! position, with no valid record after it. Everything else is [`Error::Corrupt`] naming the
//! file and offset; `soma journal check` and `salvage` are the operator's tools then.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use super::plan::{file_len, list_segments, plan};
use super::queue::{Pending, Queue};
use super::record::{Origin, READ_BUFFER, next_valid, scan_segment, segment_path};
use super::sidecar::{self, Sidecar, check_in_threads, file_name, sidecar_id};
use super::{Inbox, LogMarks, Map, State, corrupt, create_segment, sync_dir};
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
/// Batches in flight between the two threads: enough for the reader to read a whole active
/// segment of about 20 MB while the sidecars load.
const BATCHES: usize = 64;

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
    queue: Queue,
}

/// The indexing half of recovery: every key's unacknowledged messages, in order, with no
/// gap after its committed seq.
struct Index<F> {
    applied: F,
    keys: Vec<KeyScan>,
    /// Each key's place in `keys`.
    by_name: Map<Arc<str>, usize>,
    /// The reader's key numbers, to places in `keys`.
    slots: Vec<usize>,
    unfinished: Vec<(Arc<str>, Origin)>,
    /// Whether the queues were sized for the whole log yet (see [`Index::presize`]).
    presized: bool,
}

/// The queues are sized once this share of the log (1/n) has been indexed.
const PRESIZE_AFTER: u64 = 16;

impl<F: FnMut(&str) -> Result<Seq>> Index<F> {
    /// Indexes one record of segment `id`; true if it is unacknowledged.
    fn add(&mut self, path: &Path, id: u64, m: &Meta) -> Result<bool> {
        let place = self
            .slots
            .get(m.slot as usize)
            .copied()
            .unwrap_or(usize::MAX);
        let Some(scan) = self.keys.get_mut(place) else {
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

    /// Sizes every key's queue for the segments read record by record once `done` of their
    /// `total` bytes are indexed, assuming the rest holds keys in the same proportions: one allocation per key
    /// instead of a queue that doubles (and copies) its way up, which with many keys is much
    /// of the indexer's time. A key that turns out to have more grows as before.
    fn presize(&mut self, done: u64, total: u64) {
        if self.presized || done == 0 || done.saturating_mul(PRESIZE_AFTER) < total {
            return;
        }
        self.presized = true;
        let factor = total as f64 / done as f64;
        for scan in &mut self.keys {
            let scanned = scan.queue.singles();
            let expected = (scanned as f64 * factor * 1.05) as usize;
            scan.queue.reserve(expected.saturating_sub(scanned));
        }
    }

    /// Indexes a batch of segment `id`.
    /// The place of `key` in `keys`, added (with its committed seq) if it is new.
    fn place(&mut self, key: &Arc<str>) -> Result<usize> {
        if let Some(&at) = self.by_name.get(key) {
            return Ok(at);
        }
        let applied = (self.applied)(key)?;
        let at = self.keys.len();
        self.keys.push(KeyScan {
            key: key.clone(),
            applied,
            next: applied + 1,
            queue: Queue::default(),
        });
        self.by_name.insert(key.clone(), at);
        Ok(at)
    }

    /// Indexes segment `id` from its sidecar, one entry per key's run; returns how many
    /// messages are unacknowledged.
    fn add_sidecar(&mut self, path: &Path, id: u64, sidecar: Sidecar) -> Result<u64> {
        let places = sidecar
            .keys
            .iter()
            .map(|k| self.place(k))
            .collect::<Result<Vec<_>>>()?;
        for (key, _, origin) in sidecar.moved {
            let at = places[key as usize];
            self.unfinished
                .push((Arc::clone(&self.keys[at].key), origin));
        }
        let mut count = 0;
        for run in sidecar.runs {
            let scan = &mut self.keys[places[run.key as usize]];
            // Acknowledged ones are skipped; the rest must continue the key's sequence.
            let skip = run.acknowledged(scan.applied);
            let first = run.first + skip as u64;
            if skip < run.at.len() && first != scan.next {
                let key = &scan.key;
                let expected = scan.next;
                return Err(corrupt(
                    path,
                    format!(
                        "key {key:?}: seq {first} follows {}: messages {expected}..={} are \
                         missing (from its index file)",
                        expected - 1,
                        first.saturating_sub(1)
                    ),
                ));
            }
            let rest = run.at.len() - skip;
            if rest > 0 {
                scan.next = first + rest as u64;
            }
            count += rest as u64;
            scan.queue.push_span(id, run.first, run.at, skip);
        }
        Ok(count)
    }

    fn add_batch(&mut self, path: &Path, id: u64, batch: &Batch) -> Result<u64> {
        for key in &batch.new_keys {
            let at = self.place(key)?;
            self.slots.push(at);
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
#[derive(Default)]
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
        match Self::open_with(dir, marks, segment_bytes, &mut applied, true) {
            Err(Error::Corrupt { path, detail }) if sidecar_id(&file_name(&path)).is_some() => {
                // A sidecar that passed its checksum but not the check against its segment:
                // never trusted, so read every segment instead.
                tracing::warn!(path = %path.display(), %detail, "an index file does not match its segment: reading the segments instead");
                sidecar::sweep(dir, |_| false)?;
                Self::open_with(dir, marks, segment_bytes, &mut applied, false)
            }
            other => other,
        }
    }

    fn open_with(
        dir: &Path,
        marks: &LogMarks,
        segment_bytes: u64,
        mut applied: impl FnMut(&str) -> Result<Seq>,
        use_sidecars: bool,
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
            by_name: Map::default(),
            slots: Vec::new(),
            unfinished: Vec::new(),
            presized: false,
        };
        // The leading closed segments that have a sidecar are indexed from it (and checked
        // by other threads meanwhile); the rest are read and indexed record by record.
        let candidates = if use_sidecars {
            sized
                .iter()
                .take_while(|(id, len)| *len > 0 && marks.closed.get(id) == Some(len))
                .count()
        } else {
            0
        };
        let (segments, from_sidecars) = std::thread::scope(|s| {
            // The segments that have no sidecar are read while the sidecars load.
            let certain = sized[candidates..].iter().map(|(id, _)| *id).collect();
            let mut reading = start_reading(s, dir, certain)?;
            let sidecars = load_sidecars(s, dir, &sized[..candidates]);
            if sidecars.len() < candidates {
                // One did not load: read from there on instead (rare: the reader starts over).
                drop(reading.rx);
                let _ = reading.handle.join();
                let rest = sized[sidecars.len()..].iter().map(|(id, _)| *id).collect();
                reading = start_reading(s, dir, rest)?;
            }
            let scanned = &sized[sidecars.len()..];
            tracing::debug!(
                dir = %dir.display(),
                from_sidecars = sidecars.len(),
                read_whole = scanned.len(),
                "recovering the inbox log"
            );
            let expected: Vec<sidecar::Check> =
                sidecars.iter().map(|(id, s)| s.check(*id)).collect();
            let from_sidecars: Vec<u64> = expected.iter().map(|c| c.id).collect();
            let checks = check_in_threads(s, dir, expected)?;
            let mut segments = Segments::default();
            for (id, sidecar) in sidecars {
                index_from_sidecar(dir, id, sidecar, &mut index, &mut segments)?;
            }
            let Reading { handle, rx, spare } = reading;
            // `rx` is dropped when indexing ends, so that a reader blocked on a full channel
            // sees the hang-up and the scope can join it.
            let indexed = index_segments(
                dir,
                scanned,
                newest,
                marks,
                &mut index,
                (rx, spare),
                segments,
            );
            let _ = handle.join();
            let mut checked = Ok(());
            for check in checks {
                let result = check.join().unwrap_or_else(|_| {
                    Err(corrupt(dir, "a recovery check thread panicked".into()))
                });
                if checked.is_ok() {
                    checked = result;
                }
            }
            // A damaged segment before an indexing error: it is the cause.
            checked
                .and(indexed)
                .map(|segments| (segments, from_sidecars))
        })?;
        let Segments {
            files,
            mut live,
            closed,
            torn,
            pending,
        } = segments;
        if let Some((id, at, dropped)) = torn {
            cut_torn_tail(dir, id, at, dropped)?;
        }
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
        let keys: Map<Arc<str>, Queue> = index
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
        // Sidecars are written for the closed segments read without one; any other sidecar
        // (of a deleted segment, or half written) goes.
        let unindexed: Vec<u64> = closed
            .keys()
            .copied()
            .filter(|id| live.get(id).is_some_and(|n| *n > 0))
            .filter(|id| !from_sidecars.contains(id))
            .collect();
        sidecar::sweep(dir, |id| live.get(&id).is_some_and(|n| *n > 0))?;
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
                    unindexed,
                    building: Default::default(),
                    ready: Vec::new(),
                }),
            },
            report,
        ))
    }
}

/// The reading half of recovery, started.
struct Reading<'s> {
    handle: std::thread::ScopedJoinHandle<'s, ()>,
    rx: Receiver<Scanned>,
    spare: Sender<Batch>,
}

/// Starts reading segments `read` of `dir` on a thread of `s`.
fn start_reading<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    dir: &'s Path,
    read: Vec<u64>,
) -> Result<Reading<'s>> {
    let (tx, rx) = mpsc::sync_channel(BATCHES);
    let (spare, spare_rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("soma-journal-recovery".into())
        .spawn_scoped(s, move || read_segments(dir, &read, tx, spare_rx))
        .map_err(|e| Error::storage(dir, e))?;
    Ok(Reading { handle, rx, spare })
}

/// The sidecars of `segments` (id, length), loaded by two threads: the leading ones that
/// loaded, up to the first that did not.
fn load_sidecars<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    dir: &'s Path,
    segments: &'s [(u64, u64)],
) -> Vec<(u64, Sidecar)> {
    let load = move |half: usize| {
        segments
            .iter()
            .skip(half)
            .step_by(2)
            .map(|&(id, len)| Sidecar::load(dir, id, len))
            .collect::<Vec<_>>()
    };
    let other = std::thread::Builder::new()
        .name("soma-journal-load".into())
        .spawn_scoped(s, move || load(1));
    let even = load(0);
    // Without the second thread (it could not start, or failed), its half counts as not
    // loaded: those segments are read instead.
    let odd = match other {
        Ok(handle) => handle.join().unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let mut out = Vec::with_capacity(segments.len());
    let (mut even, mut odd) = (even.into_iter(), odd.into_iter());
    for (i, &(id, _)) in segments.iter().enumerate() {
        let next = if i % 2 == 0 { even.next() } else { odd.next() };
        match next.flatten() {
            Some(sidecar) => out.push((id, sidecar)),
            None => break,
        }
    }
    out
}

/// Indexes closed segment `id` from its sidecar into `index` and `out`.
fn index_from_sidecar<F: FnMut(&str) -> Result<Seq>>(
    dir: &Path,
    id: u64,
    sidecar: Sidecar,
    index: &mut Index<F>,
    out: &mut Segments,
) -> Result<()> {
    let path = segment_path(dir, id);
    out.closed.insert(id, sidecar.segment_len);
    let count = index.add_sidecar(&sidecar::sidecar_path(dir, id), id, sidecar)?;
    let file = File::open(&path).map_err(|e| Error::storage(&path, e))?;
    out.pending += count;
    out.files.insert(id, Arc::new(file));
    out.live.insert(id, count);
    Ok(())
}

/// Indexes what the reader sends, segment by segment of `read` (id, length at open): each
/// segment's damage is checked (only a torn tail is cut), and its file made durable.
fn index_segments<F: FnMut(&str) -> Result<Seq>>(
    dir: &Path,
    read: &[(u64, u64)],
    newest: Option<u64>,
    marks: &LogMarks,
    index: &mut Index<F>,
    (rx, spare): (Receiver<Scanned>, Sender<Batch>),
    mut out: Segments,
) -> Result<Segments> {
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
            // Cut once the whole open has succeeded (`cut_torn_tail`): an open that fails
            // for another reason leaves the log as it found it.
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

/// Cuts the torn tail found at `at` off segment `id`, durably.
fn cut_torn_tail(dir: &Path, id: u64, at: u64, dropped: u64) -> Result<()> {
    let path = segment_path(dir, id);
    tracing::warn!(path = %path.display(), offset = at, dropped, "cutting a torn write at the end of the inbox log");
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| Error::storage(&path, e))?;
    f.set_len(at).map_err(|e| Error::storage(&path, e))?;
    f.sync_data().map_err(|e| Error::storage(&path, e))
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
    // A segment the marker lists as closed was synced when it rolled: never torn.
    if Some(id) != newest || marks.closed.contains_key(&id) {
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
