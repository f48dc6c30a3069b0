//! The embedded journal backend on sled: one tree, checksummed records, group commit.

use std::collections::HashMap;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Append, Commit, DeadLetter, Entry, Journal, Seq, Snapshot, Timer};
use crate::codec::{decode, encode, seal, unseal};
use crate::error::{Error, Result};

const MARKER_FILE: &str = "SOMA_JOURNAL";
const MARKER: &str = "soma-journal format 1\n";
const MARKER_EVERY_MS: u64 = 1000;
const FORMAT_KEY: &[u8] = b"m\0format";
const EPOCH_KEY: &[u8] = b"m\0epoch";
const FORMAT: &[u8] = b"1";
const SEQ_CACHE_LIMIT: usize = 100_000;

const INBOX: u8 = b'i';
const STATE: u8 = b's';
const FAILURES: u8 = b'f';
const DEAD: u8 = b'd';
const TIMER: u8 = b't';

/// When an appended message counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Durability {
    /// Every append batch is fsynced before any of its senders is acknowledged. Many
    /// concurrent sends share one flush (group commit). Survives SIGKILL and power loss.
    FlushPerBatch,
    /// Appends are acknowledged once written to the engine's memory; a background flush runs
    /// every `interval_ms`. A SIGKILL or power loss can lose up to that window of
    /// acknowledged messages. For throughput where that loss is acceptable.
    Periodic {
        /// Milliseconds between background flushes.
        interval_ms: u64,
    },
}

/// Options of the sled journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SledOptions {
    /// The journal directory; created if missing.
    pub path: PathBuf,
    /// When an append is acknowledged.
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// The engine's page cache, in bytes.
    #[serde(default = "default_cache")]
    pub cache_capacity_bytes: u64,
}

fn default_durability() -> Durability {
    Durability::FlushPerBatch
}

fn default_cache() -> u64 {
    256 * 1024 * 1024
}

impl SledOptions {
    /// Options for a journal at `path` with the defaults (flush per batch, 256 MiB cache).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: default_durability(),
            cache_capacity_bytes: default_cache(),
        }
    }

    fn validate(&self) -> Result<()> {
        if let Durability::Periodic { interval_ms: 0 } = self.durability {
            return Err(Error::InvalidOption {
                key: "journal.durability.interval_ms",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// A [`Journal`] on sled, the embedded default.
#[derive(Debug, Clone)]
pub struct SledJournal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    path: PathBuf,
    durability: Durability,
    /// The last sequence number assigned per key; a cache, rebuilt from disk on a miss.
    /// Held while assigning and inserting so that sequence numbers have no gaps.
    seqs: Mutex<HashMap<Arc<str>, Seq>>,
    /// Flush epoch: incremented and stored with every flush; durable once the flush returns.
    epoch: AtomicU64,
    /// The epoch last written to the marker file.
    marked: AtomicU64,
    /// Serialises flushes so that epochs become durable in order.
    flush_lock: Mutex<()>,
    /// Commits not yet written to the engine (written with the next batch).
    staged: Mutex<Staged>,
}

/// Commits waiting for the next batch write: the latest per key, so that many commits of one
/// key between two group commits cost one write. Reads consult it first.
#[derive(Debug, Default)]
struct Staged {
    commits: HashMap<Arc<str>, StagedCommit>,
    /// Acknowledged inbox ranges whose state is already on disk (leftovers of a past run).
    garbage: Vec<(Arc<str>, Seq, Seq)>,
}

#[derive(Debug)]
struct StagedCommit {
    /// First inbox entry acknowledged since the last write.
    from: Seq,
    applied: Seq,
    state: Vec<u8>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self
            .collect()
            .and_then(|_| self.flush())
            .and_then(|()| self.mark())
        {
            tracing::error!(path = %self.path.display(), error = %e, "final journal flush failed");
        }
    }
}

impl SledJournal {
    /// Opens (or creates) the journal. A damaged, truncated or foreign directory is an
    /// [`Error::Corrupt`] naming the path, never a panic and never a silent loss: the marker
    /// file remembers the last flush epoch known durable, and a journal that recovers to an
    /// older epoch has lost data.
    pub fn open(options: SledOptions) -> Result<Self> {
        options.validate()?;
        let path = options.path.clone();
        let marked = read_marker(&path)?;
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_capacity_bytes)
            .flush_every_ms(None);
        let opened = std::panic::catch_unwind(AssertUnwindSafe(|| config.open()));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(engine_error(&path, e)),
            Err(panic) => {
                return Err(Error::Corrupt {
                    path,
                    detail: format!("storage engine failed to open: {}", panic_text(&panic)),
                });
            }
        };
        let corrupt = |detail: String| Error::Corrupt {
            path: path.clone(),
            detail,
        };
        let epoch = match db.get(FORMAT_KEY).map_err(|e| engine_error(&path, e))? {
            Some(v) if v.as_ref() == FORMAT => {
                match db.get(EPOCH_KEY).map_err(|e| engine_error(&path, e))? {
                    Some(e) => u64::from_be_bytes(
                        e.as_ref()
                            .try_into()
                            .map_err(|_| corrupt("malformed epoch record".into()))?,
                    ),
                    None => 0,
                }
            }
            Some(v) => {
                return Err(corrupt(format!(
                    "unknown journal format {:?}",
                    String::from_utf8_lossy(&v)
                )));
            }
            None if marked.is_none() && db.is_empty() => {
                db.insert(FORMAT_KEY, FORMAT)
                    .map_err(|e| engine_error(&path, e))?;
                db.flush().map_err(|e| engine_error(&path, e))?;
                write_marker(&path, 0)?;
                0
            }
            None => {
                return Err(corrupt(
                    "format record is missing: the journal was truncated or damaged".into(),
                ));
            }
        };
        if let Some(m) = marked
            && epoch < m
        {
            return Err(corrupt(format!(
                "recovered to flush epoch {epoch} but epoch {m} was durable: data was lost \
                 (truncated or damaged)"
            )));
        }
        tracing::info!(path = %path.display(), durability = ?options.durability, epoch, "journal opened");
        let inner = Arc::new(Inner {
            db,
            path,
            durability: options.durability,
            seqs: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(epoch),
            marked: AtomicU64::new(marked.unwrap_or(0)),
            flush_lock: Mutex::new(()),
            staged: Mutex::new(Staged::default()),
        });
        spawn_background(Arc::downgrade(&inner), options.durability);
        Ok(Self { inner })
    }

    /// The journal directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// The epoch recorded in the marker file; `None` for a new (missing or empty) directory.
/// A directory that holds files but no marker is not ours: refuse it rather than guess.
fn read_marker(path: &Path) -> Result<Option<u64>> {
    let corrupt = |detail: String| Error::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Err(corrupt("not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(corrupt(format!("cannot read: {e}"))),
    }
    let empty = std::fs::read_dir(path)
        .map_err(|e| corrupt(format!("cannot list: {e}")))?
        .next()
        .is_none();
    if empty {
        return Ok(None);
    }
    let Ok(text) = std::fs::read_to_string(path.join(MARKER_FILE)) else {
        return Err(corrupt(format!(
            "{MARKER_FILE} is missing: not a soma journal, or damaged"
        )));
    };
    let epoch = text
        .strip_prefix(MARKER)
        .and_then(|rest| rest.strip_prefix("epoch "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    match epoch {
        Some(e) => Ok(Some(e)),
        None => Err(corrupt(format!(
            "{MARKER_FILE} is malformed: {:?}",
            text.trim()
        ))),
    }
}

/// Atomically records that flush epoch `epoch` is durable.
fn write_marker(path: &Path, epoch: u64) -> Result<()> {
    let io = |e: std::io::Error| Error::Storage {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let tmp = path.join(format!("{MARKER_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(format!("{MARKER}epoch {epoch}\n").as_bytes())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path.join(MARKER_FILE)).map_err(io)
}

/// Flushes on a timer in periodic mode and keeps the marker's epoch current.
fn spawn_background(inner: Weak<Inner>, durability: Durability) {
    let tick = match durability {
        Durability::FlushPerBatch => Duration::from_millis(MARKER_EVERY_MS),
        Durability::Periodic { interval_ms } => {
            Duration::from_millis(interval_ms.min(MARKER_EVERY_MS))
        }
    };
    let spawned = std::thread::Builder::new()
        .name("soma-journal-flush".into())
        .spawn(move || {
            let mut last_mark = Instant::now();
            loop {
                std::thread::sleep(tick);
                let Some(inner) = inner.upgrade() else { return };
                // Commits with no append after them are written and flushed here.
                match inner.collect() {
                    Ok(true) if durability == Durability::FlushPerBatch => {
                        if let Err(e) = inner.flush() {
                            tracing::error!(path = %inner.path.display(), error = %e, "flush failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(path = %inner.path.display(), error = %e, "cannot write staged commits");
                    }
                }
                if let Durability::Periodic { .. } = durability
                    && let Err(e) = inner.flush()
                {
                    tracing::error!(path = %inner.path.display(), error = %e, "periodic flush failed");
                }
                if last_mark.elapsed() >= Duration::from_millis(MARKER_EVERY_MS) {
                    last_mark = Instant::now();
                    if let Err(e) = inner.mark() {
                        tracing::error!(path = %inner.path.display(), error = %e, "cannot update journal marker");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start journal flush thread");
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn engine_error(path: &Path, e: sled::Error) -> Error {
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

fn key_prefix(tag: u8, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 10);
    k.push(tag);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

fn seq_key(tag: u8, key: &str, seq: Seq) -> Vec<u8> {
    let mut k = key_prefix(tag, key);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn timer_key(fire_at_ms: u64, key: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 18);
    k.push(TIMER);
    k.extend_from_slice(&fire_at_ms.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn check_key(key: &str) -> Result<()> {
    if key.as_bytes().contains(&0) {
        return Err(Error::InvalidKey {
            key: key.into(),
            reason: "contains a NUL byte",
        });
    }
    Ok(())
}

fn tail_seq(raw: &[u8]) -> Option<Seq> {
    let at = raw.len().checked_sub(8)?;
    Some(u64::from_be_bytes(raw[at..].try_into().ok()?))
}

fn now_ms() -> u64 {
    crate::timers::now_ms()
}

impl Inner {
    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    fn engine(&self, e: sled::Error) -> Error {
        engine_error(&self.path, e)
    }

    fn unseal<'a>(&self, what: &str, raw_key: &[u8], record: &'a [u8]) -> Result<&'a [u8]> {
        unseal(record).ok_or_else(|| {
            self.corrupt(format!(
                "checksum mismatch in {what} record {:?}",
                String::from_utf8_lossy(raw_key)
            ))
        })
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self, key: &str) -> Result<Snapshot> {
        if let Some(c) = self.staged().commits.get(key) {
            return Ok(Snapshot {
                applied: c.applied,
                state: Some(c.state.clone()),
            });
        }
        let raw_key = key_prefix(STATE, key);
        let Some(record) = self.db.get(&raw_key).map_err(|e| self.engine(e))? else {
            return Ok(Snapshot::default());
        };
        let body = self.unseal("state", &raw_key, &record)?;
        if body.len() < 9 {
            return Err(self.corrupt(format!("state record of {key} is too short")));
        }
        let applied = u64::from_be_bytes(body[..8].try_into().unwrap_or([0; 8]));
        let state = (body[8] == 1).then(|| body[9..].to_vec());
        Ok(Snapshot { applied, state })
    }

    fn state_record(applied: Seq, state: Option<&[u8]>) -> Vec<u8> {
        let mut body = Vec::with_capacity(9 + state.map_or(0, <[u8]>::len));
        body.extend_from_slice(&applied.to_be_bytes());
        match state {
            Some(s) => {
                body.push(1);
                body.extend_from_slice(s);
            }
            None => body.push(0),
        }
        seal(&body)
    }

    /// The last sequence number used by `key`, from the cache or from disk.
    fn last_seq(&self, seqs: &mut HashMap<Arc<str>, Seq>, key: &Arc<str>) -> Result<Seq> {
        if let Some(s) = seqs.get(key) {
            return Ok(*s);
        }
        let prefix = key_prefix(INBOX, key);
        let last_inbox = match self.db.scan_prefix(&prefix).next_back() {
            Some(r) => tail_seq(&r.map_err(|e| self.engine(e))?.0).unwrap_or(0),
            None => 0,
        };
        let last = last_inbox.max(self.snapshot(key)?.applied);
        if seqs.len() >= SEQ_CACHE_LIMIT {
            seqs.clear();
        }
        seqs.insert(key.clone(), last);
        Ok(last)
    }

    /// Remembers acknowledged inbox entries to remove with the next batch write.
    fn collect_later(&self, key: &Arc<str>, from: Seq, to: Seq) {
        self.staged().garbage.push((key.clone(), from, to));
    }

    /// Moves every staged commit and collected removal into `write`; whether any was.
    fn take_staged(&self, write: &mut sled::Batch) -> bool {
        let staged = std::mem::take(&mut *self.staged());
        let any = !staged.commits.is_empty() || !staged.garbage.is_empty();
        for (key, c) in staged.commits {
            write.insert(
                key_prefix(STATE, &key),
                Inner::state_record(c.applied, Some(&c.state)),
            );
            for seq in c.from..=c.applied {
                write.remove(seq_key(INBOX, &key, seq));
            }
        }
        for (key, from, to) in staged.garbage {
            for seq in from..=to {
                write.remove(seq_key(INBOX, &key, seq));
            }
        }
        any
    }

    /// Writes staged commits now (idle periods, timers, dead letters, close); whether any
    /// was written.
    fn collect(&self) -> Result<bool> {
        let mut write = sled::Batch::default();
        if !self.take_staged(&mut write) {
            return Ok(false);
        }
        self.db.apply_batch(write).map_err(|e| self.engine(e))?;
        Ok(true)
    }

    fn append_locked(&self, batch: &[Append]) -> Result<Vec<Seq>> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(batch.len());
        let mut write = sled::Batch::default();
        self.take_staged(&mut write);
        let mut assigned: HashMap<Arc<str>, Seq> = HashMap::new();
        for a in batch {
            check_key(&a.key)?;
            let last = match assigned.get(&a.key) {
                Some(s) => *s,
                None => self.last_seq(&mut seqs, &a.key)?,
            };
            let seq = last + 1;
            assigned.insert(a.key.clone(), seq);
            write.insert(seq_key(INBOX, &a.key, seq), seal(&a.payload));
            out.push(seq);
        }
        self.db.apply_batch(write).map_err(|e| self.engine(e))?;
        seqs.extend(assigned);
        Ok(out)
    }

    /// Flushes everything written so far, advancing the durable epoch.
    fn flush(&self) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        let next = self.epoch.load(Ordering::Acquire) + 1;
        self.db
            .insert(EPOCH_KEY, &next.to_be_bytes())
            .map_err(|e| self.engine(e))?;
        let started = Instant::now();
        self.db.flush().map_err(|e| self.engine(e))?;
        crate::metrics::journal_flushed(started.elapsed());
        self.epoch.store(next, Ordering::Release);
        Ok(())
    }

    /// Records the durable epoch in the marker file if it moved.
    fn mark(&self) -> Result<()> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if self.marked.swap(epoch, Ordering::AcqRel) != epoch {
            write_marker(&self.path, epoch)?;
        }
        Ok(())
    }
}

impl Inner {
    fn redrive_locked(&self, key: &str, seq: Seq) -> Result<Seq> {
        let dead_key = seq_key(DEAD, key, seq);
        let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(record) = self.db.get(&dead_key).map_err(|e| self.engine(e))? else {
            return Err(Error::NoSuchDeadLetter {
                key: key.into(),
                seq,
            });
        };
        let body = self.unseal("dead letter", &dead_key, &record)?;
        let letter: DeadLetter =
            decode("dead letter", body).map_err(|e| self.corrupt(e.to_string()))?;
        let key_arc: Arc<str> = Arc::from(key);
        let new_seq = self.last_seq(&mut seqs, &key_arc)? + 1;
        let mut write = sled::Batch::default();
        write.remove(dead_key);
        write.insert(seq_key(INBOX, key, new_seq), seal(&letter.payload));
        self.db.apply_batch(write).map_err(|e| self.engine(e))?;
        seqs.insert(key_arc, new_seq);
        Ok(new_seq)
    }
}

impl SledJournal {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Storage {
                path: self.inner.path.clone(),
                source: Box::new(e),
            })?
    }
}

#[async_trait]
impl Journal for SledJournal {
    async fn append(&self, batch: &[Append]) -> Result<Vec<Seq>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let seqs = self.inner.append_locked(batch)?;
        if self.inner.durability == Durability::FlushPerBatch {
            self.blocking(|inner| inner.flush()).await?;
        }
        Ok(seqs)
    }

    async fn load(&self, key: &str) -> Result<Snapshot> {
        check_key(key)?;
        self.inner.snapshot(key)
    }

    async fn pending(&self, key: &str, from: Seq, limit: usize) -> Result<Vec<Entry>> {
        check_key(key)?;
        let inner = &self.inner;
        // Acknowledged entries may still be on disk until collected: start past them.
        let from = from.max(inner.snapshot(key)?.applied + 1);
        let start = seq_key(INBOX, key, from);
        let end = seq_key(INBOX, key, u64::MAX);
        let mut out = Vec::new();
        for item in inner.db.range(start..=end).take(limit) {
            let (k, v) = item.map_err(|e| inner.engine(e))?;
            let seq = tail_seq(&k).unwrap_or(0);
            let body = inner.unseal("inbox", &k, &v)?;
            out.push(Entry {
                seq,
                payload: Arc::from(body),
            });
        }
        Ok(out)
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        check_key(&commit.key)?;
        let inner = &self.inner;
        // The state record, holding the applied seq, is the commit point. It is staged and
        // written with the next group-commit batch, together with the removal of the entries
        // it acknowledges: one engine batch per group commit instead of one per message, and
        // one state write per key however many messages it handled in between. Durability
        // is unchanged: a commit was never flushed before the next flush anyway.
        {
            let mut staged = inner.staged();
            match staged.commits.get_mut(&commit.key) {
                Some(c) => {
                    c.applied = commit.seq;
                    c.state = commit.state;
                }
                None => {
                    staged.commits.insert(
                        commit.key.clone(),
                        StagedCommit {
                            from: commit.from.min(commit.seq),
                            applied: commit.seq,
                            state: commit.state,
                        },
                    );
                }
            }
        }
        if !commit.timers.is_empty() {
            // Timers must be visible to the timer task at once: write them with the state.
            let mut write = sled::Batch::default();
            inner.take_staged(&mut write);
            for (i, t) in commit.timers.iter().enumerate() {
                // Deterministic id: a replayed commit rewrites the same timer, never a second.
                let id = (commit.seq << 16) | (i as u64 & 0xffff);
                write.insert(timer_key(t.fire_at_ms, &commit.key, id), seal(&t.payload));
            }
            inner.db.apply_batch(write).map_err(|e| inner.engine(e))?;
        }
        Ok(())
    }

    async fn record_failure(&self, key: &str, seq: Seq) -> Result<u32> {
        check_key(key)?;
        let inner = &self.inner;
        let raw_key = key_prefix(FAILURES, key);
        let before = match inner.db.get(&raw_key).map_err(|e| inner.engine(e))? {
            Some(v) => {
                let body = inner.unseal("failure", &raw_key, &v)?;
                let (at, count) = body.split_at_checked(8).ok_or_else(|| {
                    inner.corrupt(format!("failure record of {key} is too short"))
                })?;
                let at = u64::from_be_bytes(at.try_into().unwrap_or([0; 8]));
                let count = u32::from_be_bytes(count.try_into().unwrap_or([0; 4]));
                if at == seq { count } else { 0 }
            }
            None => 0,
        };
        let attempts = before.saturating_add(1);
        let mut body = seq.to_be_bytes().to_vec();
        body.extend_from_slice(&attempts.to_be_bytes());
        inner
            .db
            .insert(&raw_key, seal(&body))
            .map_err(|e| inner.engine(e))?;
        self.flush().await?;
        Ok(attempts)
    }

    async fn dead_letter(&self, key: &str, seq: Seq, error: &str, attempts: u32) -> Result<()> {
        check_key(key)?;
        let inner = &self.inner;
        inner.collect()?;
        let inbox_key = seq_key(INBOX, key, seq);
        let Some(record) = inner.db.get(&inbox_key).map_err(|e| inner.engine(e))? else {
            return Err(inner.corrupt(format!("dead-lettering {key} seq {seq}: not in inbox")));
        };
        let payload = inner.unseal("inbox", &inbox_key, &record)?.to_vec();
        let snapshot = inner.snapshot(key)?;
        let letter = DeadLetter {
            key: key.to_string(),
            seq,
            payload,
            error: error.to_string(),
            attempts,
            at_ms: now_ms(),
        };
        let mut write = sled::Batch::default();
        write.insert(
            seq_key(DEAD, key, seq),
            seal(&encode("dead letter", &letter)?),
        );
        write.remove(inbox_key);
        write.remove(key_prefix(FAILURES, key));
        write.insert(
            key_prefix(STATE, key),
            Inner::state_record(seq.max(snapshot.applied), snapshot.state.as_deref()),
        );
        inner.db.apply_batch(write).map_err(|e| inner.engine(e))?;
        self.flush().await
    }

    async fn dead_letters(&self, prefix: &str) -> Result<Vec<DeadLetter>> {
        let inner = &self.inner;
        let mut scan = vec![DEAD];
        scan.extend_from_slice(prefix.as_bytes());
        let mut out = Vec::new();
        for item in inner.db.scan_prefix(scan) {
            let (k, v) = item.map_err(|e| inner.engine(e))?;
            let body = inner.unseal("dead letter", &k, &v)?;
            out.push(decode("dead letter", body).map_err(|e| inner.corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    async fn redrive(&self, key: &str, seq: Seq) -> Result<Seq> {
        check_key(key)?;
        let new_seq = self.inner.redrive_locked(key, seq)?;
        self.flush().await?;
        Ok(new_seq)
    }

    async fn next_timer(&self) -> Result<Option<u64>> {
        let inner = &self.inner;
        match inner.db.scan_prefix([TIMER]).next() {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(|e| inner.engine(e))?;
                let at = k
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| inner.corrupt("timer key is too short".into()))?;
                Ok(Some(at))
            }
        }
    }

    async fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>> {
        let inner = &self.inner;
        let mut end = vec![TIMER];
        end.extend_from_slice(&now_ms.to_be_bytes());
        end.push(0xff);
        let mut out = Vec::new();
        for item in inner.db.range(vec![TIMER]..end).take(limit) {
            let (k, v) = item.map_err(|e| inner.engine(e))?;
            let bad = || {
                inner.corrupt(format!(
                    "malformed timer key {:?}",
                    String::from_utf8_lossy(&k)
                ))
            };
            if k.len() < 1 + 8 + 1 + 8 {
                return Err(bad());
            }
            let fire_at_ms = u64::from_be_bytes(k[1..9].try_into().map_err(|_| bad())?);
            if fire_at_ms > now_ms {
                break;
            }
            let key_bytes = &k[9..k.len() - 9];
            let key = std::str::from_utf8(key_bytes).map_err(|_| bad())?;
            let id = tail_seq(&k).ok_or_else(bad)?;
            let payload = inner.unseal("timer", &k, &v)?.to_vec();
            out.push(Timer {
                key: Arc::from(key),
                fire_at_ms,
                id,
                payload,
            });
        }
        Ok(out)
    }

    async fn fire_timer(&self, timer: &Timer) -> Result<Option<Seq>> {
        check_key(&timer.key)?;
        let inner = &self.inner;
        let raw_key = timer_key(timer.fire_at_ms, &timer.key, timer.id);
        let mut seqs = inner.seqs.lock().unwrap_or_else(|p| p.into_inner());
        if !inner
            .db
            .contains_key(&raw_key)
            .map_err(|e| inner.engine(e))?
        {
            return Ok(None);
        }
        let seq = inner.last_seq(&mut seqs, &timer.key)? + 1;
        let mut write = sled::Batch::default();
        write.remove(raw_key);
        write.insert(seq_key(INBOX, &timer.key, seq), seal(&timer.payload));
        inner.db.apply_batch(write).map_err(|e| inner.engine(e))?;
        seqs.insert(timer.key.clone(), seq);
        Ok(Some(seq))
    }

    async fn keys_with_pending(&self, prefix: &str) -> Result<Vec<String>> {
        let inner = &self.inner;
        let mut out = Vec::new();
        let mut start = vec![INBOX];
        start.extend_from_slice(prefix.as_bytes());
        let scan_prefix = start.clone();
        // Skip scan: after finding a key, jump past all of its entries.
        loop {
            let Some(item) = inner.db.range(start.clone()..).next() else {
                break;
            };
            let (k, _) = item.map_err(|e| inner.engine(e))?;
            if !k.starts_with(&scan_prefix) || k.len() < 10 {
                break;
            }
            let key_bytes = &k[1..k.len() - 9];
            let key = std::str::from_utf8(key_bytes).map_err(|_| {
                inner.corrupt(format!(
                    "inbox key is not UTF-8: {:?}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            // Entries up to the applied seq are acknowledged leftovers of a previous run.
            let first = tail_seq(&k).unwrap_or(0);
            let applied = inner.snapshot(key)?.applied;
            let last = match inner.db.scan_prefix(key_prefix(INBOX, key)).next_back() {
                Some(r) => tail_seq(&r.map_err(|e| inner.engine(e))?.0).unwrap_or(0),
                None => 0,
            };
            if first <= applied {
                inner.collect_later(&Arc::from(key), first, applied.min(last));
            }
            if last > applied {
                out.push(key.to_string());
            }
            start = seq_key(INBOX, key, u64::MAX);
            start.push(0);
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|inner| inner.flush()).await
    }
}
