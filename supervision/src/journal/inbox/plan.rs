//! Which segments an open reads: every one the marker names must be there with the length
//! it names, and segments started after the marker was written must follow on without a hole.

use std::path::Path;

use super::LogMarks;
use super::corrupt;
use super::record::{segment_id, segment_path};
use crate::error::{Error, Result};

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

pub(super) fn file_len(path: &Path) -> Result<Option<u64>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::storage(path, e)),
    }
}

/// Which segments to read, checked against the marks; and leftovers of an interrupted
/// deletion (emptied segments the marker no longer lists), deleted once the open succeeds.
pub(super) fn plan(dir: &Path, marks: &LogMarks, on_disk: &[u64]) -> Result<(Vec<u64>, Vec<u64>)> {
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
