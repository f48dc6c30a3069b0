//! On-disk layout of the embedded journal: the marker file, the state store's key encoding,
//! and error mapping.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::super::inbox::{LogMarks, sync_dir};
use super::super::{KeyRange, Seq};
use crate::error::{Error, Result};

pub(super) const MARKER_FILE: &str = "SOMA_JOURNAL";
const MARKER: &str = "soma-journal format 3\n";
const OLD_MARKER: &str = "soma-journal format ";
pub(super) const FORMAT_KEY: &[u8] = b"m\0format";
pub(super) const EPOCH_KEY: &[u8] = b"m\0epoch";
/// The inbox log's durable position as of the last state-store flush (segment, length).
pub(super) const LOG_KEY: &[u8] = b"m\0log";
pub(super) const FORMAT: &[u8] = b"3";
/// Owner epochs, one record per range.
pub(super) const OWNER: u8 = b'o';

pub(super) const STATE: u8 = b's';
pub(super) const FAILURES: u8 = b'f';
pub(super) const DEAD: u8 = b'd';
pub(super) const TIMER: u8 = b't';
/// Where each key's last replay after a crash began.
pub(super) const REPLAY: u8 = b'r';

/// The state store (sled) lives here, below the journal directory.
pub(super) fn state_dir(path: &Path) -> PathBuf {
    path.join("state")
}

/// The inbox log lives here.
pub(super) fn inbox_dir(path: &Path) -> PathBuf {
    path.join("inbox")
}

/// What the marker file records as durable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Marker {
    /// The state store's flush epoch.
    pub(super) epoch: u64,
    /// The inbox log's segments (`log.active` is `None` until the first open finished).
    pub(super) log: LogMarks,
    /// The journal was closed cleanly (nothing was killed mid-work).
    pub(super) clean: bool,
}

fn corrupt(path: &Path, detail: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

/// The marker of the journal at `path`; `None` for a new (missing or empty) directory. A
/// directory that holds files but no marker is not ours: refuse it rather than guess.
pub(super) fn read_marker(path: &Path) -> Result<Option<Marker>> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Err(corrupt(path, "not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(corrupt(path, format!("cannot read: {e}"))),
    }
    // A first open killed before its marker was renamed into place leaves at most the
    // temporary marker: the directory is still new.
    let tmp = format!("{MARKER_FILE}.tmp");
    let empty = std::fs::read_dir(path)
        .map_err(|e| corrupt(path, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok())
        .all(|e| e.file_name().to_str() == Some(tmp.as_str()));
    if empty {
        return Ok(None);
    }
    let Ok(text) = std::fs::read_to_string(path.join(MARKER_FILE)) else {
        return Err(corrupt(
            path,
            format!("{MARKER_FILE} is missing: not a soma journal, or damaged"),
        ));
    };
    let malformed = || {
        corrupt(
            path,
            format!("{MARKER_FILE} is malformed: {:?}", text.trim()),
        )
    };
    let Some(rest) = text.strip_prefix(MARKER) else {
        if let Some(version) = text.strip_prefix(OLD_MARKER) {
            return Err(corrupt(
                path,
                format!(
                    "journal format {} is not readable by this version (format 3)",
                    version.lines().next().unwrap_or_default()
                ),
            ));
        }
        return Err(malformed());
    };
    let mut marker = Marker::default();
    let num = |s: &str| s.parse::<u64>().map_err(|_| malformed());
    for line in rest.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["epoch", n] => marker.epoch = num(n)?,
            ["log", seg, len] => marker.log.active = Some((num(seg)?, num(len)?)),
            ["closed", seg, len] => {
                marker.log.closed.insert(num(seg)?, num(len)?);
            }
            ["clean"] => marker.clean = true,
            _ => return Err(malformed()),
        }
    }
    Ok(Some(marker))
}

/// Atomically records what is durable.
pub(super) fn write_marker(path: &Path, marker: Marker) -> Result<()> {
    let io = |e: std::io::Error| Error::storage(path, e);
    let mut text = format!("{MARKER}epoch {}\n", marker.epoch);
    if let Some((seg, len)) = marker.log.active {
        text.push_str(&format!("log {seg} {len}\n"));
    }
    for (seg, len) in &marker.log.closed {
        text.push_str(&format!("closed {seg} {len}\n"));
    }
    if marker.clean {
        text.push_str("clean\n");
    }
    let tmp = path.join(format!("{MARKER_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path.join(MARKER_FILE)).map_err(io)?;
    // The rename itself must survive a crash.
    sync_dir(path)
}

pub(super) fn engine_error(path: &Path, e: sled::Error) -> Error {
    match e {
        sled::Error::Corruption { at, .. } => Error::Corrupt {
            path: path.to_path_buf(),
            detail: format!("storage engine reports corruption at {at:?}"),
        },
        sled::Error::Unsupported(s) => Error::Corrupt {
            path: path.to_path_buf(),
            detail: format!("storage engine: {s}"),
        },
        other => Error::storage(path, other.into()),
    }
}

pub(super) fn key_prefix(tag: u8, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 10);
    k.push(tag);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

pub(super) fn seq_key(tag: u8, key: &str, seq: Seq) -> Vec<u8> {
    let mut k = key_prefix(tag, key);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Timers sort by range, then fire time: each range's due timers are one prefix scan.
pub(super) fn timer_key(range: KeyRange, fire_at_ms: u64, key: &str, id: u64) -> Vec<u8> {
    let mut k = timer_prefix(range);
    k.reserve(key.len() + 17);
    k.extend_from_slice(&fire_at_ms.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(super) fn timer_prefix(range: KeyRange) -> Vec<u8> {
    let mut k = Vec::with_capacity(5);
    k.push(TIMER);
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

/// Length of a timer key before the actor key: tag, range, fire time.
pub(super) const TIMER_HEAD: usize = 1 + 4 + 8;

pub(super) fn owner_key(range: KeyRange) -> [u8; 5] {
    let mut k = [OWNER, 0, 0, 0, 0];
    k[1..].copy_from_slice(&range.0.to_be_bytes());
    k
}

pub(super) fn check_key(key: &str) -> Result<()> {
    if key.as_bytes().contains(&0) {
        return Err(Error::InvalidKey {
            key: key.into(),
            reason: "contains a NUL byte",
        });
    }
    if key.len() > u16::MAX as usize {
        return Err(Error::InvalidKey {
            key: key.chars().take(64).collect(),
            reason: "is longer than 65535 bytes",
        });
    }
    Ok(())
}

pub(super) fn tail_seq(raw: &[u8]) -> Option<Seq> {
    let at = raw.len().checked_sub(8)?;
    Some(u64::from_be_bytes(raw[at..].try_into().ok()?))
}
