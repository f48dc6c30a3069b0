//! The inbox log's record format and the scanners that read it back.
//!
//! A record is `len: u32 LE, crc32(body): u32 LE, body`, the body being
//! `key_len: u16 LE, key, seq: u64 LE, origin tag (+ fields), payload`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::super::Seq;

/// Largest record accepted when reading (a damaged length must not allocate gigabytes).
pub(crate) const MAX_RECORD: usize = crate::codec::MAX_RECORD_BYTES;
pub(crate) const HEADER: usize = 8;
/// Recovery reads segments through a buffer of this size.
pub(crate) const READ_BUFFER: usize = 256 * 1024;

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

/// The file of segment `id` in `dir`.
pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// The segment id of a file name, if it is a segment.
pub(crate) fn segment_id(name: &str) -> Option<u64> {
    numbered(name, ".log")
}

/// The number of a file named by [`segment_path`]'s pattern with extension `ext`.
pub(crate) fn numbered(name: &str, ext: &str) -> Option<u64> {
    let digits = name.strip_suffix(ext)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Appends one record to `out`; returns the offset of its payload within `out`.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    key: &str,
    seq: Seq,
    origin: Origin,
    payload: &[u8],
) -> usize {
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
    let payload_at = out.len();
    out.extend_from_slice(payload);
    let body = &out[start + HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    payload_at
}

/// One decoded record, borrowing from the buffer it was read from.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    pub(crate) key: &'a str,
    pub(crate) seq: Seq,
    pub(crate) origin: Origin,
    pub(crate) payload: &'a [u8],
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

/// Parses the record at `at`; `None` if it is torn or damaged.
pub(crate) fn parse_at(bytes: &[u8], at: usize) -> Option<(Record<'_>, usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
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

/// The offset of the first valid record in `bytes` at or after `from`, if any. Used after
/// damage: a crash leaves damage only at the very end, so a valid record after it means
/// the damage is corruption, not a torn write.
pub(crate) fn next_valid(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(HEADER - 1)).find(|&at| parse_at(bytes, at).is_some())
}

pub(crate) enum ScanError {
    Io(std::io::Error),
    Record(crate::error::Error),
}

impl ScanError {
    /// The crate error, an I/O failure naming the segment at `path`.
    pub(crate) fn at(self, path: &Path) -> crate::error::Error {
        match self {
            ScanError::Io(e) => crate::error::Error::storage(path, e),
            ScanError::Record(e) => e,
        }
    }
}

/// Reads a segment's records in order through `buf` (grown for a record larger than it),
/// calling `on_record(record offset, payload offset, record)`. Returns the offset of the
/// first torn or damaged record, if any.
pub(crate) fn scan_segment(
    file: &File,
    buf: &mut Vec<u8>,
    mut on_record: impl FnMut(u64, u64, Record<'_>) -> crate::error::Result<()>,
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

/// What a lenient scan of a whole segment found: every readable record (offset, record) and
/// every damaged stretch (start, end) between them.
#[derive(Debug, Default)]
pub(crate) struct Lenient<'a> {
    pub(crate) records: Vec<(u64, Record<'a>)>,
    pub(crate) damaged: Vec<(u64, u64)>,
}

/// Reads every record that can be read from `bytes`, skipping damage by searching for the
/// next valid record (for `soma journal check` and `salvage`, never for recovery).
pub(crate) fn scan_lenient(bytes: &[u8]) -> Lenient<'_> {
    let mut out = Lenient::default();
    let mut at = 0usize;
    while at < bytes.len() {
        match parse_at(bytes, at) {
            Some((record, next)) => {
                out.records.push((at as u64, record));
                at = next;
            }
            None => {
                let resume = next_valid(bytes, at + 1).unwrap_or(bytes.len());
                out.damaged.push((at as u64, resume as u64));
                at = resume;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn segment_names_round_trip() {
        let dir = Path::new("/x");
        let p = segment_path(dir, 42);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert_eq!(segment_id(name), Some(42));
        assert_eq!(segment_id("42.log"), None);
        assert_eq!(segment_id("0000000000000000004x.log"), None);
    }

    #[test]
    fn lenient_scan_skips_damage_and_finds_what_follows() {
        let mut bytes = Vec::new();
        for seq in 1..=5u64 {
            encode_record(&mut bytes, "k", seq, Origin::Send, &[seq as u8; 40]);
        }
        let record = bytes.len() / 5;
        bytes[record * 2 + 20] ^= 0xff; // inside the third record
        let scan = scan_lenient(&bytes);
        let seqs: Vec<u64> = scan.records.iter().map(|(_, r)| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 4, 5]);
        assert_eq!(
            scan.damaged,
            vec![((record * 2) as u64, (record * 3) as u64)]
        );
    }

    proptest! {
        #[test]
        fn parsing_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut at = 0;
            while let Some((_, next)) = parse_at(&bytes, at) {
                prop_assert!(next > at);
                at = next;
            }
            let _ = scan_lenient(&bytes);
        }

        #[test]
        fn records_round_trip(
            key in "[a-z/]{1,20}",
            seq in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut buf = Vec::new();
            let at = encode_record(&mut buf, &key, seq, Origin::Redrive { seq: 3 }, &payload);
            prop_assert_eq!(&buf[at..], payload.as_slice());
            let (r, next) = parse_at(&buf, 0).unwrap();
            prop_assert_eq!(next, buf.len());
            prop_assert_eq!(r.key, key.as_str());
            prop_assert_eq!(r.seq, seq);
            prop_assert_eq!(r.origin, Origin::Redrive { seq: 3 });
            prop_assert_eq!(r.payload, payload.as_slice());
        }
    }
}
