//! The operator's tools for a damaged journal: [`check`] (read-only report) and [`salvage`]
//! (copy everything readable into a new journal, with a report of what was lost). The runtime
//! never cuts acknowledged data on its own: it refuses to open and names the damage; an
//! operator decides.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::layout::{
    DEAD, FAILURES, MARKER_FILE, Marker, OWNER, REPLAY, STATE, TIMER, inbox_dir, read_marker,
    state_dir,
};
use super::{SledJournal, SledOptions, decode_state_record, open_state_store};
use crate::codec::unseal;
use crate::error::{Error, Result};
use crate::journal::inbox::list_segments_if_any;
use crate::journal::inbox::record::{Origin, scan_lenient, segment_path};
use crate::journal::{Bytes, Seq};

/// One inbox segment as [`check`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// Its file.
    pub path: PathBuf,
    /// Its length on disk.
    pub bytes: u64,
    /// Readable records.
    pub records: u64,
    /// Damaged stretches: (from offset, to offset).
    pub damaged: Vec<(u64, u64)>,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// The journal directory.
    pub path: PathBuf,
    /// Whether the last close was clean.
    pub clean: bool,
    /// Segments read, in order.
    pub segments: Vec<SegmentReport>,
    /// Pending (unacknowledged, readable) messages per key.
    pub pending: BTreeMap<String, u64>,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Timers stored.
    pub timers: u64,
    /// Everything wrong, each naming a file (and an offset where there is one).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "journal {}", self.path.display())?;
        writeln!(
            f,
            "last close: {}",
            if self.clean {
                "clean"
            } else {
                "not clean (crash or kill)"
            }
        )?;
        for s in &self.segments {
            writeln!(
                f,
                "segment {}: {} bytes, {} records{}",
                s.path.display(),
                s.bytes,
                s.records,
                if s.damaged.is_empty() {
                    String::new()
                } else {
                    format!(", damaged at {:?}", s.damaged)
                }
            )?;
        }
        writeln!(
            f,
            "pending: {} messages for {} keys",
            self.pending.values().sum::<u64>(),
            self.pending.len()
        )?;
        for (key, n) in &self.pending {
            writeln!(f, "  {key}: {n}")?;
        }
        writeln!(
            f,
            "dead letters: {}, timers: {}",
            self.dead_letters, self.timers
        )?;
        if self.problems.is_empty() {
            writeln!(f, "ok: no damage found")
        } else {
            writeln!(f, "{} problems:", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
            Ok(())
        }
    }
}

/// What [`salvage`] copied and what it could not.
#[derive(Debug, Clone, Default)]
pub struct SalvageReport {
    /// The source's check.
    pub check: CheckReport,
    /// The new journal.
    pub out: PathBuf,
    /// Committed states copied.
    pub states: u64,
    /// Pending messages copied.
    pub messages: u64,
    /// Messages that got a new sequence number because earlier ones were lost:
    /// (key, old seq, new seq).
    pub renumbered: Vec<(String, Seq, Seq)>,
    /// What was lost, one line each.
    pub lost: Vec<String>,
}

impl fmt::Display for SalvageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.check)?;
        writeln!(f, "salvaged into {}", self.out.display())?;
        writeln!(
            f,
            "copied: {} states, {} pending messages",
            self.states, self.messages
        )?;
        for (key, old, new) in &self.renumbered {
            writeln!(f, "renumbered: {key} seq {old} is now {new}")?;
        }
        if self.lost.is_empty() {
            writeln!(f, "lost: nothing")
        } else {
            writeln!(f, "lost ({}):", self.lost.len())?;
            for l in &self.lost {
                writeln!(f, "  {l}")?;
            }
            Ok(())
        }
    }
}

/// A readable pending message found by the scan.
struct Found {
    seq: Seq,
    origin: Origin,
    payload: Vec<u8>,
}

/// Everything the read-only scan of a journal produced.
struct Scan {
    report: CheckReport,
    /// Every readable record of the state store (copied for salvage), by raw key.
    records: Vec<(Vec<u8>, Vec<u8>)>,
    applied: BTreeMap<String, Seq>,
    found: BTreeMap<String, Vec<Found>>,
    ranges: Option<u32>,
}

/// A temporary copy of the state store: sled writes when it opens, `check` must not.
struct Copy(PathBuf);

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn scan(path: &Path) -> Result<Scan> {
    let mut report = CheckReport {
        path: path.to_path_buf(),
        ..CheckReport::default()
    };
    let marker: Marker = match read_marker(path)? {
        Some(m) => m,
        None => {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                detail: format!("no journal here ({MARKER_FILE} is missing)"),
            });
        }
    };
    report.clean = marker.clean;
    // The state store, through a copy.
    let copy = Copy(std::env::temp_dir().join(format!(
        "soma-journal-check-{}-{}",
        std::process::id(),
        crate::clock::wall_ms()
    )));
    let mut records = Vec::new();
    let mut applied = BTreeMap::new();
    let mut ranges = None;
    let state = state_dir(path);
    let opened = copy_dir(&state, &state_dir(&copy.0))
        .map_err(|e| Error::storage(&state, e))
        .and_then(|()| open_state_store(&copy.0, 64 << 20));
    match opened {
        Err(e) => report
            .problems
            .push(format!("{}: state store unreadable: {e}", state.display())),
        Ok(db) => {
            for item in db.iter() {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => {
                        report
                            .problems
                            .push(format!("{}: state store read failed: {e}", state.display()));
                        break;
                    }
                };
                let key_text = String::from_utf8_lossy(&k[1.min(k.len())..]).replace('\0', "/");
                match k.first().copied() {
                    Some(STATE) => match decode_state_record(&v) {
                        Ok(s) => {
                            let key = String::from_utf8_lossy(&k[1..k.len().saturating_sub(1)])
                                .into_owned();
                            applied.insert(key, s.applied);
                            records.push((k.to_vec(), v.to_vec()));
                        }
                        Err(d) => report
                            .problems
                            .push(format!("{}: state of {key_text}: {d}", state.display())),
                    },
                    Some(tag @ (FAILURES | DEAD | TIMER | OWNER | REPLAY)) => {
                        if unseal(&v).is_some() {
                            if tag == DEAD {
                                report.dead_letters += 1;
                            }
                            if tag == TIMER {
                                report.timers += 1;
                            }
                            records.push((k.to_vec(), v.to_vec()));
                        } else {
                            report.problems.push(format!(
                                "{}: checksum mismatch in record {key_text:?}",
                                state.display()
                            ));
                        }
                    }
                    Some(b'm') if k.as_ref() == super::RANGES_KEY && v.len() == 8 => {
                        ranges = v
                            .as_ref()
                            .try_into()
                            .ok()
                            .map(|b| u64::from_be_bytes(b) as u32);
                    }
                    _ => {}
                }
            }
        }
    }
    // The inbox, every segment on disk, leniently.
    let dir = inbox_dir(path);
    let ids = list_segments_if_any(&dir)?;
    for (&id, &len) in &marker.log.closed {
        if !ids.contains(&id) {
            report.problems.push(format!(
                "{}: missing (the marker lists it as closed with {len} bytes)",
                segment_path(&dir, id).display()
            ));
        }
    }
    if let Some((active, durable)) = marker.log.active
        && !ids.contains(&active)
    {
        report.problems.push(format!(
            "{}: missing (the marker names it as the active segment, {durable} bytes durable)",
            segment_path(&dir, active).display()
        ));
    }
    let mut found: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for id in ids {
        let seg = segment_path(&dir, id);
        let bytes = std::fs::read(&seg).map_err(|e| Error::storage(&seg, e))?;
        let lenient = scan_lenient(&bytes);
        let len = bytes.len() as u64;
        if let Some(&want) = marker.log.closed.get(&id)
            && want != len
        {
            report.problems.push(format!(
                "{}: holds {len} bytes, held {want} when closed",
                seg.display()
            ));
        }
        if let Some((active, durable)) = marker.log.active
            && active == id
            && len < durable
        {
            report.problems.push(format!(
                "{}: holds {len} bytes but {durable} were durable",
                seg.display()
            ));
        }
        for (from, to) in &lenient.damaged {
            report.problems.push(format!(
                "{}: damaged bytes at offsets {from}..{to}",
                seg.display()
            ));
        }
        for (_, r) in &lenient.records {
            if r.seq > applied.get(r.key).copied().unwrap_or(0) {
                found.entry(r.key.to_string()).or_default().push(Found {
                    seq: r.seq,
                    origin: r.origin,
                    payload: r.payload.to_vec(),
                });
            }
        }
        report.segments.push(SegmentReport {
            path: seg,
            bytes: len,
            records: lenient.records.len() as u64,
            damaged: lenient.damaged,
        });
    }
    for (key, msgs) in &mut found {
        msgs.sort_by_key(|m| m.seq);
        msgs.dedup_by_key(|m| m.seq);
        let mut expected = applied.get(key).copied().unwrap_or(0) + 1;
        for m in msgs.iter() {
            if m.seq != expected {
                report.problems.push(format!(
                    "key {key:?}: messages {expected}..={} are missing",
                    m.seq - 1
                ));
            }
            expected = m.seq + 1;
        }
        report.pending.insert(key.clone(), msgs.len() as u64);
    }
    drop(copy);
    Ok(Scan {
        report,
        records,
        applied,
        found,
        ranges,
    })
}

/// Reads the journal at `path` without changing it and reports its segments, the pending
/// messages per key, and every damage found, with file and offset.
pub fn check(path: &Path) -> Result<CheckReport> {
    Ok(scan(path)?.report)
}

/// Copies everything readable of the journal at `path` into a new journal at `out` (which
/// must not exist or be empty): committed states, failure counts, dead letters, timers,
/// owner epochs and every readable pending message. Messages after a lost one are
/// renumbered to follow on without a gap (listed in the report). The report is also written
/// to `<out>/SALVAGE_REPORT`.
pub fn salvage(path: &Path, out: &Path) -> Result<SalvageReport> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| Error::storage(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::InvalidOption {
            key: "salvage.out",
            reason: format!("{} exists and is not empty", out.display()),
        });
    }
    let scan = scan(path)?;
    let mut options = SledOptions::new(out);
    if let Some(r) = scan.ranges {
        options.ranges = r;
    }
    let journal = SledJournal::open(options)?;
    let inner = &journal.inner;
    let mut report = SalvageReport {
        out: out.to_path_buf(),
        ..SalvageReport::default()
    };
    let mut batch = sled::Batch::default();
    for (k, v) in &scan.records {
        if k.first() == Some(&STATE) {
            report.states += 1;
        }
        batch.insert(k.as_slice(), v.as_slice());
    }
    inner.db.apply_batch(batch).map_err(|e| inner.engine(e))?;
    inner.flush()?;
    let mut seqs = inner.seqs();
    for (key, msgs) in scan.found {
        let key: Arc<str> = Arc::from(key.as_str());
        let first = scan.applied.get(&*key).copied().unwrap_or(0) + 1;
        let mut expected = first;
        for (next, m) in (first..).zip(msgs) {
            if m.seq > expected {
                report.lost.push(format!(
                    "{key}: messages {expected}..={} (unreadable)",
                    m.seq - 1
                ));
            }
            if m.seq != next {
                report.renumbered.push((key.to_string(), m.seq, next));
            }
            expected = m.seq + 1;
            seqs.insert(key.clone(), next - 1);
            inner.append_moved(&mut seqs, &key, m.origin, Bytes::from(m.payload))?;
            report.messages += 1;
        }
    }
    drop(seqs);
    report.lost.extend(scan.report.problems.iter().cloned());
    report.check = scan.report;
    inner.close()?;
    let text = report.to_string();
    let file = out.join("SALVAGE_REPORT");
    std::fs::write(&file, text).map_err(|e| Error::storage(&file, e))?;
    Ok(report)
}
