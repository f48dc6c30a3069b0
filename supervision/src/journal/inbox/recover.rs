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

/// Per key while scanning: its name, applied seq, unacknowledged messages.
type KeyScan = (Arc<str>, Seq, VecDeque<Pending>);

impl Inbox {
    /// Opens the log in `dir`, reading every live segment. `applied` gives each key's
    /// committed seq: older messages are acknowledged and skipped. `marks` is what the marker
    /// recorded (see [`LogMarks`]).
    pub(crate) fn open(
        dir: &Path,
        marks: &LogMarks,
        segment_bytes: u64,
        mut applied: impl FnMut(&str) -> Result<Seq>,
    ) -> Result<(Self, Recovered)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::storage(dir, e))?;
        let on_disk = list_segments(dir)?;
        let (read, leftovers) = plan(dir, marks, &on_disk)?;
        let mut recovered: Vec<KeyScan> = Vec::new();
        let mut slot_of: Map<Arc<str>, usize> = Map::default();
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        let mut closed: BTreeMap<u64, u64> = BTreeMap::new();
        let mut report = Recovered::default();
        // The newest segment holding anything: an empty one after it is a roll that failed
        // half-way (or was never written to), not what a torn tail can be in.
        let mut newest = read.last().copied();
        for &id in read.iter().rev() {
            if file_len(&segment_path(dir, id))?.unwrap_or(0) > 0 {
                newest = Some(id);
                break;
            }
        }
        let mut files: Map<u64, Arc<File>> = Map::default();
        let mut buf = vec![0u8; READ_BUFFER];
        for &id in &read {
            let path = segment_path(dir, id);
            let file = File::open(&path).map_err(|e| Error::storage(&path, e))?;
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
                    report.unfinished.push((Arc::clone(key), record.origin));
                }
                if record.seq <= *applied_seq {
                    return Ok(());
                }
                let expected = queue.back().map_or(*applied_seq + 1, |p| p.seq + 1);
                if record.seq != expected {
                    let detail = if record.seq > expected {
                        format!(
                            "key {key:?}: seq {} at offset {offset} follows {}: messages \
                             {expected}..={} are missing",
                            record.seq,
                            expected - 1,
                            record.seq - 1
                        )
                    } else {
                        format!(
                            "key {key:?}: seq {} at offset {offset} is out of order (expected \
                             {expected})",
                            record.seq
                        )
                    };
                    return Err(corrupt(&path, detail));
                }
                queue.push_back(Pending {
                    seq: record.seq,
                    segment: id,
                    offset: payload_offset,
                    len: record.payload.len() as u32,
                    memory: None,
                });
                count += 1;
                Ok(())
            })
            .map_err(|e| e.at(&path))?;
            let len = file.metadata().map_err(|e| Error::storage(&path, e))?.len();
            let mut kept = len;
            if let Some(at) = end {
                check_torn(&path, &file, id, at, len, newest, marks)?;
                tracing::warn!(path = %path.display(), offset = at, dropped = len - at, "cutting a torn write at the end of the inbox log");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::storage(&path, e))?;
                f.set_len(at).map_err(|e| Error::storage(&path, e))?;
                report.torn = Some((id, at, len - at));
                kept = at;
            }
            // What a killed process wrote may still be only in the page cache: make it
            // durable before anything is built on it.
            file.sync_data().map_err(|e| Error::storage(&path, e))?;
            report.pending += count;
            files.insert(id, Arc::new(file));
            live.insert(id, count);
            closed.insert(id, kept);
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
