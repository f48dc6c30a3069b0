//! Index files of closed segments ("sidecars"): `NNN.idx` beside segment `NNN.log` lists
//! every record of it by key (runs of consecutive seqs with their payload offsets and
//! lengths), the records moved in from elsewhere, and the CRC-32 of the whole segment as it
//! was when the sidecar was made. Recovery builds its index of a segment from its sidecar
//! instead of parsing and looking up the key of every record, while other threads compute
//! the segment's CRC-32: when it matches, the segment holds exactly the bytes the sidecar was
//! made from, so the sidecar's contents are taken as they are (they are covered by its own
//! checksum); when it does not, the segment is read record by record (damage is corruption;
//! none means the sidecar is stale, and it is not used).
//!
//! A sidecar is made while its segment is written (the inbox feeds a [`Builder`] each batch)
//! and written out by the journal thread after the segment closes, or, for a segment read at
//! open, made from the segment itself. One that is missing, damaged or made for another
//! length is ignored and removed; the segment is then read as if it had none.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::Seq;
use super::Map;
use super::corrupt;
use super::record::{Origin, READ_BUFFER, numbered, scan_segment, segment_path};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SOMAIDX1";

/// The sidecar of segment `id` in `dir`.
pub(crate) fn sidecar_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.idx"))
}

/// The segment id of a sidecar's file name, if it is one.
pub(crate) fn sidecar_id(name: &str) -> Option<u64> {
    numbered(name, ".idx")
}

/// Consecutive records of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    /// The key, by its number in [`Sidecar::keys`].
    pub(crate) key: u32,
    /// The seq of the first record; the others follow one by one.
    pub(crate) first: Seq,
    /// (payload offset, payload length) of each record.
    pub(crate) at: Vec<(u32, u32)>,
}

impl Run {
    /// How many of its records are acknowledged when the key's committed seq is `applied`.
    pub(crate) fn acknowledged(&self, applied: Seq) -> usize {
        applied
            .saturating_sub(self.first.saturating_sub(1))
            .min(self.at.len() as u64) as usize
    }
}

/// What the check of a segment against its sidecar needs of the sidecar.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Check {
    pub(crate) id: u64,
    pub(crate) segment_crc: u32,
    pub(crate) records: u64,
}

/// What a sidecar says of its segment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Sidecar {
    /// The segment's length when the sidecar was written.
    pub(crate) segment_len: u64,
    /// CRC-32 of the whole segment as it was read to write the sidecar: when the segment
    /// still has it, every record is as the sidecar lists it.
    pub(crate) segment_crc: u32,
    /// Records in the segment.
    pub(crate) records: u64,
    /// [`Digest`] of the records' payload offsets and lengths.
    pub(crate) digest: u64,
    pub(crate) keys: Vec<Arc<str>>,
    /// Runs in the order of their first record.
    pub(crate) runs: Vec<Run>,
    /// Records moved in from elsewhere: (key number, seq, origin).
    pub(crate) moved: Vec<(u32, Seq, Origin)>,
}

/// An order-independent digest of records, so that the checking threads and the sidecar
/// agree without sorting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Digest {
    pub(crate) records: u64,
    pub(crate) sum: u64,
}

impl Digest {
    pub(crate) fn add(&mut self, payload_offset: u64, len: u64) {
        self.records += 1;
        let x = payload_offset
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29)
            ^ len.wrapping_mul(0xff51_afd7_ed55_8ccd);
        self.sum = self.sum.wrapping_add(x);
    }
}

/// A sidecar in the making, record by record: while a segment is written (the inbox adds
/// each batch it appends), or from a segment read back.
#[derive(Debug, Default)]
pub(crate) struct Builder {
    out: Sidecar,
    numbers: Map<Arc<str>, u32>,
    /// The run each key is in, by key number.
    open_run: Vec<Option<usize>>,
    digest: Digest,
    crc: crc32fast::Hasher,
    /// Offsets past 4 GiB cannot be listed, nor more than [`MAX_RUNS`] runs kept in memory:
    /// no sidecar then (the segment is read record by record at the next open).
    too_big: bool,
}

/// Runs a sidecar may have (each about 100 bytes while it is built): a segment of many keys
/// with a message or two each is cheaper to read back than to index in memory.
pub(crate) const MAX_RUNS: usize = 256 * 1024;

impl Builder {
    /// Adds the CRC of bytes appended to the segment (computed before the inbox's lock is
    /// taken; combining is cheap).
    pub(crate) fn bytes(&mut self, crc: &crc32fast::Hasher) {
        self.crc.combine(crc);
    }

    /// Adds one record; `owned` makes the key's shared name the first time it is met.
    pub(crate) fn record(
        &mut self,
        key: &str,
        owned: impl FnOnce() -> Arc<str>,
        seq: Seq,
        origin: Origin,
        payload_offset: u64,
        len: usize,
    ) {
        if self.too_big {
            return;
        }
        let number = match self.numbers.get(key) {
            Some(k) => *k,
            None => {
                let k = self.out.keys.len() as u32;
                let name = owned();
                self.numbers.insert(name.clone(), k);
                self.out.keys.push(name);
                self.open_run.push(None);
                k
            }
        };
        self.digest.add(payload_offset, len as u64);
        let (Ok(offset), Ok(len)) = (u32::try_from(payload_offset), u32::try_from(len)) else {
            self.too_big = true;
            return;
        };
        let runs = &mut self.out.runs;
        let run = self.open_run[number as usize]
            .filter(|&r| runs[r].first + runs[r].at.len() as u64 == seq);
        match run {
            Some(r) => runs[r].at.push((offset, len)),
            None if runs.len() >= MAX_RUNS => self.too_big = true,
            None => {
                self.open_run[number as usize] = Some(runs.len());
                runs.push(Run {
                    key: number,
                    first: seq,
                    at: vec![(offset, len)],
                });
            }
        }
        if origin != Origin::Send {
            self.out.moved.push((number, seq, origin));
        }
    }

    /// The sidecar of a segment of `segment_len` bytes, if it can be listed.
    pub(crate) fn finish(self, segment_len: u64) -> Option<Sidecar> {
        if self.too_big || self.digest.records == 0 {
            return None;
        }
        Some(Sidecar {
            segment_len,
            segment_crc: self.crc.finalize(),
            records: self.digest.records,
            digest: self.digest.sum,
            ..self.out
        })
    }
}

impl Sidecar {
    /// Reads segment `id` of `dir` and describes it; `None` if a record of it is damaged
    /// (recovery reports that, not this) or it cannot be described (over 4 GiB).
    pub(crate) fn build(dir: &Path, id: u64) -> Result<Option<Sidecar>> {
        let path = segment_path(dir, id);
        let file = File::open(&path).map_err(|e| Error::storage(&path, e))?;
        let segment_len = file.metadata().map_err(|e| Error::storage(&path, e))?.len();
        let mut builder = Builder::default();
        let mut buf = vec![0u8; READ_BUFFER];
        let damaged = scan_segment(&file, &mut buf, |_, payload_offset, record| {
            builder.record(
                record.key,
                || Arc::from(record.key),
                record.seq,
                record.origin,
                payload_offset,
                record.payload.len(),
            );
            Ok(())
        })
        .map_err(|e| e.at(&path))?;
        if damaged.is_some() {
            return Ok(None);
        }
        let crc = crc_of(&file, &path)?;
        Ok(builder.finish(segment_len).map(|s| Sidecar {
            segment_crc: crc,
            ..s
        }))
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.records as usize * 8);
        b.extend_from_slice(MAGIC);
        for n in [self.segment_len, self.records, self.digest] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(&self.segment_crc.to_le_bytes());
        b.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        for k in &self.keys {
            b.extend_from_slice(&(k.len() as u16).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
        }
        b.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for r in &self.runs {
            b.extend_from_slice(&r.key.to_le_bytes());
            b.extend_from_slice(&r.first.to_le_bytes());
            b.extend_from_slice(&(r.at.len() as u32).to_le_bytes());
            for (offset, len) in &r.at {
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
            }
        }
        b.extend_from_slice(&(self.moved.len() as u32).to_le_bytes());
        for (key, seq, origin) in &self.moved {
            b.extend_from_slice(&key.to_le_bytes());
            b.extend_from_slice(&seq.to_le_bytes());
            let (tag, x, y) = match *origin {
                Origin::Send => (0u8, 0, 0),
                Origin::Redrive { seq } => (1, seq, 0),
                Origin::Timer { fire_at_ms, id } => (2, fire_at_ms, id),
            };
            b.push(tag);
            b.extend_from_slice(&x.to_le_bytes());
            b.extend_from_slice(&y.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// What checking segment `id` against this sidecar needs.
    pub(crate) fn check(&self, id: u64) -> Check {
        Check {
            id,
            segment_crc: self.segment_crc,
            records: self.records,
        }
    }

    /// Parses a sidecar; `None` for anything that is not a whole, consistent one.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Sidecar> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut r = Reader(body);
        if r.take(8)? != MAGIC {
            return None;
        }
        let mut out = Sidecar {
            segment_len: r.u64()?,
            records: r.u64()?,
            digest: r.u64()?,
            segment_crc: r.u32()?,
            ..Sidecar::default()
        };
        let nkeys = r.u32()?;
        for _ in 0..nkeys {
            let len = r.u16()? as usize;
            out.keys
                .push(Arc::from(std::str::from_utf8(r.take(len)?).ok()?));
        }
        let mut total = 0u64;
        for _ in 0..r.u32()? {
            let key = r.u32()?;
            if key >= nkeys {
                return None;
            }
            let first = r.u64()?;
            let n = r.u32()? as usize;
            // Bounded by the bytes left, before anything is allocated.
            if n.checked_mul(8)? > r.0.len() || n == 0 || first == 0 {
                return None;
            }
            first.checked_add(n as u64)?;
            let mut at = Vec::with_capacity(n);
            for _ in 0..n {
                at.push((r.u32()?, r.u32()?));
            }
            total += n as u64;
            out.runs.push(Run { key, first, at });
        }
        for _ in 0..r.u32()? {
            let key = r.u32()?;
            if key >= nkeys {
                return None;
            }
            let seq = r.u64()?;
            let tag = r.take(1)?[0];
            let (x, y) = (r.u64()?, r.u64()?);
            let origin = match tag {
                1 => Origin::Redrive { seq: x },
                2 => Origin::Timer {
                    fire_at_ms: x,
                    id: y,
                },
                _ => return None,
            };
            out.moved.push((key, seq, origin));
        }
        // The digest is of what the runs say, so that the check against the segment checks
        // the runs themselves.
        (r.0.is_empty() && total == out.records && out.digest_of_runs() == out.digest)
            .then_some(out)
    }

    /// The [`Digest`] sum of the records the runs list.
    pub(crate) fn digest_of_runs(&self) -> u64 {
        let mut d = Digest::default();
        for run in &self.runs {
            for &(offset, len) in &run.at {
                d.add(u64::from(offset), u64::from(len));
            }
        }
        d.sum
    }

    /// Writes the sidecar of segment `id` in `dir` to a temporary file, synced; `publish`
    /// renames it into place (or removes it when it returns false).
    pub(crate) fn write(
        &self,
        dir: &Path,
        id: u64,
        publish: impl FnOnce(&dyn Fn() -> std::io::Result<()>) -> bool,
    ) -> Result<()> {
        let path = sidecar_path(dir, id);
        let tmp = dir.join(format!("{id:020}.idx.tmp"));
        let io = |e: std::io::Error| Error::storage(&path, e);
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&self.encode()).map_err(io)?;
        f.sync_data().map_err(io)?;
        let rename = || std::fs::rename(&tmp, &path);
        if !publish(&rename) {
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        super::sync_dir(dir)
    }

    /// The sidecar of segment `id` in `dir` if there is a whole one written for its length
    /// `segment_len`; any other is removed.
    pub(crate) fn load(dir: &Path, id: u64, segment_len: u64) -> Option<Sidecar> {
        let path = sidecar_path(dir, id);
        let bytes = std::fs::read(&path).ok()?;
        match Sidecar::decode(&bytes) {
            Some(s) if s.segment_len == segment_len => Some(s),
            _ => {
                tracing::warn!(path = %path.display(), "ignoring a damaged or stale index file of a segment (the segment is read instead)");
                remove(dir, id);
                None
            }
        }
    }
}

/// Removes the sidecar of segment `id`, if any (a failure only costs a slower open).
pub(crate) fn remove(dir: &Path, id: u64) {
    let path = sidecar_path(dir, id);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an index file")
        }
    }
}

/// CRC-32 of the whole of `file`, read from its start.
pub(crate) fn crc_of(file: &File, path: &Path) -> Result<u32> {
    use std::os::unix::fs::FileExt;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut at = 0u64;
    loop {
        let n = file
            .read_at(&mut buf, at)
            .map_err(|e| Error::storage(path, e))?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
}

/// Reads segment `file` whole, checking every record: the records' digest and the offset
/// of the first damaged record, if any.
pub(crate) fn verify(file: &File, path: &Path) -> Result<(Digest, Option<u64>)> {
    let mut digest = Digest::default();
    let mut buf = vec![0u8; READ_BUFFER];
    let damaged = scan_segment(file, &mut buf, |_, payload_offset, record| {
        digest.add(payload_offset, record.payload.len() as u64);
        Ok(())
    })
    .map_err(|e| e.at(path))?;
    Ok((digest, damaged))
}

/// Starts the threads that read every record of the sidecar segments and check it against
/// its checksum and the sidecar (two threads when there are two or more segments: the
/// indexing itself is light then).
#[allow(clippy::type_complexity)]
pub(super) fn check_in_threads<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    dir: &'s Path,
    sidecars: Vec<Check>,
) -> Result<Vec<std::thread::ScopedJoinHandle<'s, Result<()>>>> {
    let threads = sidecars.len().min(2);
    let sidecars = Arc::new(sidecars);
    (0..threads)
        .map(|t| {
            let sidecars = Arc::clone(&sidecars);
            std::thread::Builder::new()
                .name("soma-journal-check".into())
                .spawn_scoped(s, move || {
                    for check in sidecars.iter().skip(t).step_by(threads) {
                        check_against(dir, check)?;
                    }
                    Ok(())
                })
                .map_err(|e| Error::storage(dir, e))
        })
        .collect()
}

/// Reads closed segment `id` whole: every record must be whole and match its checksum, and
/// the records must be exactly those its sidecar lists.
fn check_against(dir: &Path, sidecar: &Check) -> Result<()> {
    let id = sidecar.id;
    let path = segment_path(dir, id);
    let file = File::open(&path).map_err(|e| Error::storage(&path, e))?;
    // Closed segments were synced when they rolled; a killed process may have left pages
    // only in the cache when it wrote the rest, so this stays cheap and certain.
    file.sync_data().map_err(|e| Error::storage(&path, e))?;
    // The bytes the sidecar was written from: every record is whole and as it lists them.
    if crc_of(&file, &path)? == sidecar.segment_crc {
        return Ok(());
    }
    // Otherwise find out what differs, record by record.
    let (digest, damaged) = verify(&file, &path)?;
    if let Some(at) = damaged {
        return Err(corrupt(
            &path,
            format!(
                "damaged record at offset {at} in a closed segment (a crash only tears the \
                 end of the newest one)"
            ),
        ));
    }
    // Every record is whole, yet the segment is not what the sidecar was written from.
    Err(corrupt(
        &sidecar_path(dir, id),
        format!(
            "index file was written for other contents of its segment ({} records listed, \
             {} found)",
            sidecar.records, digest.records
        ),
    ))
}

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The segment ids of the sidecars in `dir`.
#[cfg(test)]
pub(crate) fn list_sidecars(dir: &Path) -> Result<Vec<u64>> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::storage(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| sidecar_id(e.file_name().to_str()?))
        .collect())
}

/// Removes every sidecar in `dir` of a segment `keep` refuses, and half-written ones.
pub(crate) fn sweep(dir: &Path, keep: impl Fn(u64) -> bool) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::storage(dir, e))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        match sidecar_id(&name) {
            Some(id) if keep(id) => {}
            Some(id) => remove(dir, id),
            None if name.ends_with(".idx.tmp") => {
                let _ = std::fs::remove_file(entry.path());
            }
            None => {}
        }
    }
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Sidecar {
        let mut s = Sidecar {
            segment_len: 4096,
            segment_crc: 5,
            records: 3,
            digest: 0,
            keys: vec![Arc::from("a"), Arc::from("b")],
            runs: vec![
                Run {
                    key: 0,
                    first: 5,
                    at: vec![(10, 3), (40, 3)],
                },
                Run {
                    key: 1,
                    first: 1,
                    at: vec![(70, 1)],
                },
            ],
            moved: vec![(
                1,
                1,
                Origin::Timer {
                    fire_at_ms: 9,
                    id: 2,
                },
            )],
        };
        s.digest = s.digest_of_runs();
        s
    }

    #[test]
    fn a_sidecar_reads_back_as_written() {
        let s = sample();
        assert_eq!(Sidecar::decode(&s.encode()), Some(s));
    }

    #[test]
    fn every_damaged_or_cut_copy_is_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert_eq!(Sidecar::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert_eq!(Sidecar::decode(&b), None, "byte {i} flipped");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Sidecar::decode(&bytes);
        }

        #[test]
        fn arbitrary_bodies_with_a_valid_checksum_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&body);
            let crc = crc32fast::hash(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = Sidecar::decode(&b);
        }
    }
}
