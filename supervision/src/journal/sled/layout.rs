//! On-disk layout of the embedded journal: the marker file, the state store's key encoding,
//! and error mapping.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::super::Seq;
use super::super::inbox::Position;
use crate::error::{Error, Result};

pub(super) const MARKER_FILE: &str = "SOMA_JOURNAL";
const MARKER: &str = "soma-journal format 2\n";
pub(super) const FORMAT_KEY: &[u8] = b"m\0format";
pub(super) const EPOCH_KEY: &[u8] = b"m\0epoch";
pub(super) const FORMAT: &[u8] = b"2";

pub(super) const STATE: u8 = b's';
pub(super) const FAILURES: u8 = b'f';
pub(super) const DEAD: u8 = b'd';
pub(super) const TIMER: u8 = b't';

/// The state store (sled) lives here, below the journal directory.
pub(super) fn state_dir(path: &Path) -> PathBuf {
    path.join("state")
}

/// The inbox log lives here.
pub(super) fn inbox_dir(path: &Path) -> PathBuf {
    path.join("inbox")
}

/// What the marker file records as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Marker {
    /// The state store's flush epoch.
    pub(super) epoch: u64,
    /// The inbox log's durable position.
    pub(super) log: Option<Position>,
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
    let empty = std::fs::read_dir(path)
        .map_err(|e| corrupt(path, format!("cannot list: {e}")))?
        .next()
        .is_none();
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
        return Err(malformed());
    };
    let mut marker = Marker::default();
    for line in rest.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("epoch"), Some(n), None) => marker.epoch = n.parse().map_err(|_| malformed())?,
            (Some("log"), Some(seg), Some(len)) => {
                marker.log = Some((
                    seg.parse().map_err(|_| malformed())?,
                    len.parse().map_err(|_| malformed())?,
                ));
            }
            _ => return Err(malformed()),
        }
    }
    Ok(Some(marker))
}

/// Atomically records what is durable.
pub(super) fn write_marker(path: &Path, marker: Marker) -> Result<()> {
    let io = |e: std::io::Error| Error::Storage {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let mut text = format!("{MARKER}epoch {}\n", marker.epoch);
    if let Some((seg, len)) = marker.log {
        text.push_str(&format!("log {seg} {len}\n"));
    }
    let tmp = path.join(format!("{MARKER_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path.join(MARKER_FILE)).map_err(io)
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
        other => Error::Storage {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
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

pub(super) fn timer_key(fire_at_ms: u64, key: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 18);
    k.push(TIMER);
    k.extend_from_slice(&fire_at_ms.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
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
