//! The embedded journal: an append-only segment log for the inbox (see `inbox`) and sled for
//! everything keyed (committed states, failure counts, dead letters, timers, owner epochs).

mod check;
mod layout;
mod store;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use self::layout::{
    DEAD, EPOCH_KEY, FAILURES, FORMAT, FORMAT_KEY, LOG_KEY, Marker, REPLAY, STATE, TIMER_HEAD,
    check_key, engine_error, inbox_dir, key_prefix, read_marker, seq_key, state_dir, tail_seq,
    timer_key, timer_prefix, write_marker,
};
use self::store::{Inner, StagedCommit};
use super::inbox::record::Origin;
use super::inbox::{Inbox, SEGMENT_BYTES};
use super::{
    Append, Bytes, Commit, DeadLetter, Entry, Epoch, Journal, KeyRange, Seq, Snapshot, Timer,
    range_of,
};
use crate::codec::{MAX_MESSAGE_BYTES, decode, encode, seal, unseal};
use crate::error::{Error, Fence, Result, panic_text};

pub use self::check::{CheckReport, SalvageReport, check, salvage};

/// The marker follows the log's durable end at most this far behind (it is written only
/// when something moved): a truncation of the newest segment that removes only what was
/// appended in this window before a crash cannot be told from a torn write.
const MARKER_EVERY: Duration = Duration::from_millis(100);
/// How often staged commits are written and flushed when no append carries them.
const COMMIT_EVERY: Duration = Duration::from_millis(50);
const RANGES_KEY: &[u8] = b"m\0ranges";
/// How long an open waits for a state store still locked by this process's last close.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Concurrent reads of recovered payloads on the blocking pool.
const DISK_READERS: usize = 4;

/// When an appended message counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Durability {
    /// Every append batch is fdatasynced before any of its senders is acknowledged. Many
    /// concurrent sends share one sync (group commit). Survives SIGKILL and power loss.
    FlushPerBatch,
    /// Appends are acknowledged once written to the operating system; a background sync runs
    /// every `interval_ms`. A SIGKILL loses nothing written; a power loss can lose up to that
    /// window of acknowledged messages.
    Periodic {
        /// Milliseconds between background syncs.
        interval_ms: u64,
    },
}

/// Options of the embedded journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SledOptions {
    /// The journal directory; created if missing.
    pub path: PathBuf,
    /// When an append is acknowledged.
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// The state store's page cache, in bytes.
    #[serde(default = "default_cache")]
    pub cache_capacity_bytes: u64,
    /// Key ranges (the unit of ownership); fixed when the journal is created.
    #[serde(default = "default_ranges")]
    pub ranges: u32,
    /// An inbox segment is closed past this size.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// The largest message an append accepts.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_durability() -> Durability {
    Durability::FlushPerBatch
}

fn default_cache() -> u64 {
    256 * 1024 * 1024
}

fn default_ranges() -> u32 {
    64
}

fn default_segment_bytes() -> u64 {
    SEGMENT_BYTES
}

fn default_max_message_bytes() -> usize {
    MAX_MESSAGE_BYTES
}

impl SledOptions {
    /// Options for a journal at `path` with the defaults (flush per batch, 256 MiB cache, 64
    /// ranges, 64 MiB segments, 64 MiB messages).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: default_durability(),
            cache_capacity_bytes: default_cache(),
            ranges: default_ranges(),
            segment_bytes: default_segment_bytes(),
            max_message_bytes: default_max_message_bytes(),
        }
    }

    /// Checks every value, naming the option that is wrong.
    pub fn validate(&self) -> Result<()> {
        if let Durability::Periodic { interval_ms: 0 } = self.durability {
            return Err(Error::InvalidOption {
                key: "journal.durability.interval_ms",
                reason: "must be at least 1".into(),
            });
        }
        if !(1..=65_536).contains(&self.ranges) {
            return Err(Error::InvalidOption {
                key: "journal.ranges",
                reason: format!("must be within 1..=65536, got {}", self.ranges),
            });
        }
        if self.segment_bytes < 4096 {
            return Err(Error::InvalidOption {
                key: "journal.segment_bytes",
                reason: format!("must be at least 4096, got {}", self.segment_bytes),
            });
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES {
            return Err(Error::InvalidOption {
                key: "journal.max_message_bytes",
                reason: format!(
                    "must be within 1..={MAX_MESSAGE_BYTES}, got {}",
                    self.max_message_bytes
                ),
            });
        }
        Ok(())
    }
}

/// The embedded [`Journal`]: inbox in a segment log, states and the rest in sled.
#[derive(Debug, Clone)]
pub struct SledJournal {
    inner: Arc<Inner>,
    background: Arc<Background>,
    /// Bounds concurrent disk reads of recovered payloads: a thousand keys replaying at once
    /// must not become a thousand blocking-pool threads.
    readers: Arc<tokio::sync::Semaphore>,
}

/// The journal thread: keeps the marker current, syncs in periodic mode, writes staged
/// commits. Stopped and joined by `close`.
#[derive(Debug)]
struct Background {
    stop: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Background {
    fn stop(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

impl SledJournal {
    /// Opens (or creates) the journal. A damaged, truncated or foreign directory is an
    /// [`Error::Corrupt`] naming the path, never a panic and never a silent loss: every
    /// record is checksummed, and the marker file remembers what was durable, so a journal
    /// that recovers to less has lost data and says so. Blocking: call it off the async
    /// workers (`Runtime::open` does).
    pub fn open(options: SledOptions) -> Result<Self> {
        options.validate()?;
        let path = options.path.clone();
        let marked = read_marker(&path)?;
        if marked.is_none() {
            // A new journal: the marker comes first, so that whatever a crash leaves behind
            // from here on is recognisably ours.
            std::fs::create_dir_all(&path).map_err(|e| Error::storage(&path, e))?;
            write_marker(&path, Marker::default())?;
        }
        let marker = marked.clone().unwrap_or_default();
        let creating = marker.log.active.is_none();
        if creating {
            // The first open never finished: nothing was acknowledged. Start the state store
            // again (the inbox check refuses segments that hold data).
            let ids = super::inbox::list_segments_if_any(&inbox_dir(&path))?;
            if super::inbox::first_with_data(&inbox_dir(&path), &ids)?.is_none() {
                match std::fs::remove_dir_all(state_dir(&path)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::storage(&state_dir(&path), e)),
                }
            }
        }
        let unclean = !creating && !marker.clean;
        let opening = Instant::now();
        let db = open_state_store(&path, options.cache_capacity_bytes)?;
        let state_store = opening.elapsed();
        let corrupt = |detail: String| Error::Corrupt {
            path: path.clone(),
            detail,
        };
        let engine = |e| engine_error(&state_dir(&path), e);
        let be_u64 = |v: &[u8], what: &str| -> Result<u64> {
            Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
                corrupt(format!("malformed {what} record"))
            })?))
        };
        let epoch = match db.get(FORMAT_KEY).map_err(engine)? {
            Some(v) if v.as_ref() == FORMAT => match db.get(EPOCH_KEY).map_err(engine)? {
                Some(e) => be_u64(&e, "epoch")?,
                None => 0,
            },
            Some(v) => {
                return Err(corrupt(format!(
                    "unsupported journal format {:?}",
                    String::from_utf8_lossy(&v)
                )));
            }
            None if creating && db.is_empty() => {
                db.insert(FORMAT_KEY, FORMAT).map_err(engine)?;
                db.insert(RANGES_KEY, &u64::from(options.ranges).to_be_bytes())
                    .map_err(engine)?;
                db.flush().map_err(engine)?;
                0
            }
            None => {
                return Err(corrupt(
                    "format record is missing: the journal was truncated or damaged".into(),
                ));
            }
        };
        let ranges = match db.get(RANGES_KEY).map_err(engine)? {
            Some(v) => be_u64(&v, "ranges")? as u32,
            None => return Err(corrupt("ranges record is missing".into())),
        };
        if ranges != options.ranges {
            return Err(Error::InvalidOption {
                key: "journal.ranges",
                reason: format!(
                    "the journal at {} was created with {ranges} ranges, not {}",
                    path.display(),
                    options.ranges
                ),
            });
        }
        if epoch < marker.epoch {
            return Err(corrupt(format!(
                "state store recovered to flush epoch {epoch} but epoch {} was durable: data \
                 was lost (truncated or damaged)",
                marker.epoch
            )));
        }
        // The newer of the marker's and the state store's record of the log's durable end.
        let mut marks = marker.log.clone();
        if let (Some((seg, len)), Some(v)) = (marks.active, db.get(LOG_KEY).map_err(engine)?)
            && v.len() == 16
        {
            let (s, l) = (be_u64(&v[..8], "log")?, be_u64(&v[8..], "log")?);
            if s == seg && l > len {
                marks.active = Some((seg, l));
            }
        }
        let started = Instant::now();
        let (inbox, recovered) =
            Inbox::open(&inbox_dir(&path), &marks, options.segment_bytes, |key| {
                read_applied(&db, &path, key)
            })?;
        let inbox_done = started.elapsed();
        let inner = Arc::new(Inner {
            db,
            inbox,
            path,
            durability: options.durability,
            ranges,
            max_message_bytes: options.max_message_bytes,
            unclean,
            seqs: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(epoch),
            marked: Mutex::new(marker),
            flush_lock: Mutex::new(()),
            commit_lock: Mutex::new(()),
            staged: Mutex::new(HashMap::new()),
            owners: RwLock::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        inner.finish_moves(&recovered.unfinished)?;
        // The marker must name the new active segment before anything can be deleted, and
        // no longer say "clean" while this process runs.
        inner.flush()?;
        inner.mark()?;
        tracing::info!(
            path = %inner.path.display(),
            durability = ?options.durability,
            epoch,
            unclean,
            pending = recovered.pending,
            torn_bytes = recovered.torn.map_or(0, |t| t.2),
            state_store_ms = state_store.as_millis() as u64,
            inbox_ms = inbox_done.as_millis() as u64,
            recovery_ms = started.elapsed().as_millis() as u64,
            total_ms = opening.elapsed().as_millis() as u64,
            "journal opened"
        );
        let background = spawn_background(Arc::downgrade(&inner), options.durability);
        Ok(Self {
            inner,
            background,
            readers: Arc::new(tokio::sync::Semaphore::new(DISK_READERS)),
        })
    }

    /// The journal directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Ends the journal as a crash would: staged commits are lost, nothing more is flushed or
    /// marked, and every further write is refused. Drop every handle, then open it again.
    #[cfg(any(test, feature = "test-util"))]
    pub fn crash(&self) {
        self.background.stop();
        self.inner.closed.store(true, Ordering::Release);
        self.inner.staged().clear();
    }

    /// Bytes of message payloads held in memory (appended by this process, not yet handled).
    pub fn memory_bytes(&self) -> u64 {
        self.inner.inbox.memory_bytes()
    }
}

fn open_state_store(path: &Path, cache: u64) -> Result<sled::Db> {
    let dir = state_dir(path);
    let config = sled::Config::new()
        .path(&dir)
        .cache_capacity(cache)
        .flush_every_ms(None);
    // sled's worker threads let go of the directory's lock a moment after the last handle
    // is dropped: an open right after a close in the same process waits for it (bounded).
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match std::panic::catch_unwind(AssertUnwindSafe(|| config.open())) {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Err(e)) => return Err(engine_error(&dir, e)),
            Err(panic) => {
                return Err(Error::Corrupt {
                    path: dir,
                    detail: format!("storage engine failed to open: {}", panic_text(&*panic)),
                });
            }
        }
    }
}

/// The raw state record of `key`, if it has one.
fn get_state_record(db: &sled::Db, path: &Path, key: &str) -> Result<Option<sled::IVec>> {
    db.get(key_prefix(STATE, key))
        .map_err(|e| engine_error(&state_dir(path), e))
}

fn state_corrupt(path: &Path, key: &str, detail: &str) -> Error {
    Error::Corrupt {
        path: state_dir(path),
        detail: format!("state of {key}: {detail}"),
    }
}

fn read_snapshot(db: &sled::Db, path: &Path, key: &str) -> Result<Snapshot> {
    match get_state_record(db, path, key)? {
        None => Ok(Snapshot::default()),
        Some(record) => {
            decode_state_record(&record).map_err(|detail| state_corrupt(path, key, detail))
        }
    }
}

/// The applied seq of `key`, without copying its state.
fn read_applied(db: &sled::Db, path: &Path, key: &str) -> Result<Seq> {
    match get_state_record(db, path, key)? {
        None => Ok(0),
        Some(record) => split_state_record(&record)
            .map(|(applied, _)| applied)
            .map_err(|detail| state_corrupt(path, key, detail)),
    }
}

/// A state record's applied seq, and what follows it (the state flag and the state).
fn split_state_record(record: &[u8]) -> Result<(Seq, &[u8]), &'static str> {
    let body = unseal(record).ok_or("checksum mismatch")?;
    let (applied, rest) = body.split_at_checked(8).ok_or("record is too short")?;
    Ok((
        u64::from_be_bytes(applied.try_into().unwrap_or([0; 8])),
        rest,
    ))
}

fn decode_state_record(record: &[u8]) -> Result<Snapshot, &'static str> {
    let (applied, rest) = split_state_record(record)?;
    let state = match rest.split_first() {
        Some((1, s)) => Some(s.to_vec()),
        Some((0, _)) => None,
        _ => return Err("record is malformed"),
    };
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

fn spawn_background(inner: std::sync::Weak<Inner>, durability: Durability) -> Arc<Background> {
    let (stop, stopped) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("soma-journal".into())
        .spawn(move || {
            let mut last_mark = Instant::now();
            let mut last_sync = Instant::now();
            let sync_every = match durability {
                Durability::FlushPerBatch => None,
                Durability::Periodic { interval_ms } => Some(Duration::from_millis(interval_ms)),
            };
            let tick = COMMIT_EVERY.min(sync_every.unwrap_or(COMMIT_EVERY));
            // Ends when `close` drops the sender (or the journal is gone).
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                let Some(inner) = inner.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                let mut result = inner.flush_if_staged();
                if let Some(every) = sync_every
                    && last_sync.elapsed() >= every
                {
                    last_sync = Instant::now();
                    result = result.and_then(|()| inner.inbox.sync());
                }
                if last_mark.elapsed() >= MARKER_EVERY {
                    last_mark = Instant::now();
                    result = result.and_then(|()| inner.mark());
                }
                if let Err(e) = result {
                    tracing::error!(path = %inner.path.display(), error = %e, "journal background work failed");
                }
                // Last, and one segment read at most: the rest waits for the next tick.
                inner.inbox.write_sidecars(1);
            }
        });
    let thread = match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the journal thread");
            None
        }
    };
    Arc::new(Background {
        stop: Mutex::new(Some(stop)),
        thread: Mutex::new(thread),
    })
}

impl SledJournal {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::storage(&self.inner.path, std::io::Error::other(e.to_string())))?
    }
}

#[async_trait]
impl Journal for SledJournal {
    fn ranges(&self) -> u32 {
        self.inner.ranges
    }

    fn recovered_from_crash(&self) -> bool {
        self.inner.unclean
    }

    async fn acquire(&self, range: KeyRange) -> Result<Epoch> {
        let epochs = self.blocking(move |inner| inner.acquire(&[range])).await?;
        epochs
            .first()
            .copied()
            .ok_or(Error::Stopped { what: "journal" })
    }

    async fn acquire_many(&self, ranges: &[KeyRange]) -> Result<Vec<Epoch>> {
        let ranges = ranges.to_vec();
        self.blocking(move |inner| inner.acquire(&ranges)).await
    }

    async fn release(&self, range: KeyRange, epoch: Epoch) -> Result<()> {
        self.blocking(move |inner| inner.release(range, epoch))
            .await
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<Seq>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let batch = batch.to_vec();
        self.blocking(move |inner| inner.append(&batch)).await
    }

    async fn load(&self, key: &str) -> Result<Snapshot> {
        check_key(key)?;
        self.inner.snapshot(key)
    }

    async fn pending(&self, key: &str, from: Seq, limit: usize) -> Result<Vec<Entry>> {
        check_key(key)?;
        // Acknowledged messages stay in the index until their commit is written: skip them.
        let from_applied = from.max(self.inner.applied(key)? + 1);
        if let Some(entries) = self.inner.inbox.pending_in_memory(key, from_applied, limit) {
            return Ok(entries);
        }
        let key = key.to_string();
        // Recovered payloads are read from disk: off the async workers, a few at a time.
        let _permit = self
            .readers
            .acquire()
            .await
            .map_err(|_| Error::Stopped { what: "journal" })?;
        self.blocking(move |inner| inner.inbox.pending(&key, from_applied, limit))
            .await
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        check_key(&commit.key)?;
        let inner = &self.inner;
        inner.open_for_writes()?;
        // The state record, holding the applied seq, is the commit point. It is staged and
        // written with other commits by the journal thread (or the next flush): one state
        // store batch for many commits, one state write per key however many messages it
        // handled in between. A commit lost in a crash is replayed: its messages are in the
        // inbox until the commit is durable.
        if commit.timers.is_empty() {
            let _owner = inner.hold_epoch(&commit.key, commit.epoch)?;
            let mut staged = inner.staged();
            let applied = match staged.get(&commit.key) {
                Some(c) => c.applied,
                None => read_applied(&inner.db, &inner.path, &commit.key)?,
            };
            if commit.from != applied + 1 {
                drop(staged);
                return Err(inner.fenced(
                    &commit.key,
                    Fence::NotNext {
                        from: commit.from,
                        applied,
                    },
                ));
            }
            staged.insert(
                commit.key.clone(),
                StagedCommit {
                    applied: commit.seq,
                    state: Some(commit.state),
                },
            );
            return Ok(());
        }
        // Timers are numbered in 16 bits within a commit.
        if commit.timers.len() > 1 << 16 {
            return Err(Error::InvalidOption {
                key: "commit.timers",
                reason: format!(
                    "{} timers in one commit, at most 65536",
                    commit.timers.len()
                ),
            });
        }
        // Timers must be visible to the timer task at once, and atomic with their state:
        // one batch with both.
        let Commit {
            key,
            from,
            seq,
            state,
            timers,
            epoch,
        } = commit;
        self.blocking(move |inner| {
            let _owner = inner.hold_epoch(&key, epoch)?;
            let range = range_of(&key, inner.ranges);
            inner.write_staged(|taken, write| {
                let applied = inner.snapshot_in(taken, &key)?.applied;
                if from != applied + 1 {
                    return Err(inner.fenced(&key, Fence::NotNext { from, applied }));
                }
                for (i, t) in timers.iter().enumerate() {
                    // Deterministic id: a replayed commit rewrites the same timer.
                    let id = (seq << 16) | (i as u64 & 0xffff);
                    write.insert(timer_key(range, t.fire_at_ms, &key, id), seal(&t.payload));
                }
                taken.insert(
                    key,
                    StagedCommit {
                        applied: seq,
                        state: Some(state),
                    },
                );
                Ok(())
            })
        })
        .await
    }

    async fn record_failure(&self, key: &str, seq: Seq) -> Result<u32> {
        check_key(key)?;
        let key = key.to_string();
        self.blocking(move |inner| inner.record_failure(&key, seq))
            .await
    }

    async fn begin_replays(&self, keys: &[(Arc<str>, Seq)]) -> Result<Vec<bool>> {
        for (k, _) in keys {
            check_key(k)?;
        }
        let keys = keys.to_vec();
        self.blocking(move |inner| {
            let mut same = Vec::with_capacity(keys.len());
            let mut write = sled::Batch::default();
            for (key, seq) in &keys {
                let raw = key_prefix(REPLAY, key);
                same.push(inner.sealed_u64("replay", &raw)? == Some(*seq));
                write.insert(raw, seal(&seq.to_be_bytes()));
            }
            inner.db.apply_batch(write).map_err(|e| inner.engine(e))?;
            inner.flush()?;
            Ok(same)
        })
        .await
    }

    async fn dead_letter(
        &self,
        key: &str,
        seq: Seq,
        error: &str,
        attempts: u32,
        epoch: Epoch,
    ) -> Result<()> {
        check_key(key)?;
        self.inner.open_for_writes()?;
        let key_arc: Arc<str> = Arc::from(key);
        let error = error.to_string();
        self.blocking(move |inner| {
            let _owner = inner.hold_epoch(&key_arc, epoch)?;
            let Some(payload) = inner.inbox.payload(&key_arc, seq)? else {
                return Err(inner.corrupt(format!(
                    "dead-lettering {key_arc} seq {seq}: not in the inbox"
                )));
            };
            let letter = DeadLetter {
                key: key_arc.to_string(),
                seq,
                payload: payload.to_vec(),
                error,
                attempts,
                at_ms: crate::clock::wall_ms(),
            };
            let record = seal(&encode("dead letter", &letter)?);
            // One batch: the dead letter exists if and only if the message is acknowledged.
            // The state stays; the applied seq moves past the dead message.
            inner.write_staged(|taken, write| {
                let snapshot = inner.snapshot_in(taken, &key_arc)?;
                if seq != snapshot.applied + 1 {
                    return Err(inner.fenced(
                        &key_arc,
                        Fence::NotNext {
                            from: seq,
                            applied: snapshot.applied,
                        },
                    ));
                }
                write.insert(seq_key(DEAD, &key_arc, seq), record);
                write.remove(key_prefix(FAILURES, &key_arc));
                taken.insert(
                    key_arc.clone(),
                    StagedCommit {
                        applied: seq,
                        state: snapshot.state,
                    },
                );
                Ok(())
            })?;
            inner.flush()
        })
        .await
    }

    async fn dead_letters(&self, prefix: &str) -> Result<Vec<DeadLetter>> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let mut scan = vec![DEAD];
            scan.extend_from_slice(prefix.as_bytes());
            let mut out = Vec::new();
            for item in inner.db.scan_prefix(scan) {
                let (k, v) = item.map_err(|e| inner.engine(e))?;
                let body = inner.unseal("dead letter", &k, &v)?;
                out.push(decode("dead letter", body).map_err(|e| inner.corrupt(e.to_string()))?);
            }
            Ok(out)
        })
        .await
    }

    async fn redrive(&self, key: &str, seq: Seq, epoch: Epoch) -> Result<Seq> {
        check_key(key)?;
        self.inner.open_for_writes()?;
        let key: Arc<str> = Arc::from(key);
        self.blocking(move |inner| {
            let _owner = inner.hold_epoch(&key, epoch)?;
            let mut seqs = inner.seqs();
            let dead_key = seq_key(DEAD, &key, seq);
            let Some(record) = inner.db.get(&dead_key).map_err(|e| inner.engine(e))? else {
                return Err(Error::NoSuchDeadLetter {
                    key: key.to_string(),
                    seq,
                });
            };
            let body = inner.unseal("dead letter", &dead_key, &record)?;
            let letter: DeadLetter =
                decode("dead letter", body).map_err(|e| inner.corrupt(e.to_string()))?;
            // Append first (durably), then remove the dead letter; a crash in between is
            // finished at the next open (the appended record names its origin).
            let new_seq = inner.append_moved(
                &mut seqs,
                &key,
                Origin::Redrive { seq },
                Bytes::from(letter.payload),
            )?;
            inner.db.remove(&dead_key).map_err(|e| inner.engine(e))?;
            Ok(new_seq)
        })
        .await
    }

    async fn next_timer(&self, range: KeyRange) -> Result<Option<u64>> {
        let inner = &self.inner;
        match inner.db.scan_prefix(timer_prefix(range)).next() {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(|e| inner.engine(e))?;
                let at = k
                    .get(5..TIMER_HEAD)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| inner.corrupt("timer key is too short".into()))?;
                Ok(Some(at))
            }
        }
    }

    async fn due_timers(&self, range: KeyRange, now_ms: u64, limit: usize) -> Result<Vec<Timer>> {
        let inner = &self.inner;
        let start = timer_prefix(range);
        let mut end = start.clone();
        end.extend_from_slice(&now_ms.to_be_bytes());
        end.push(0xff);
        let mut out = Vec::new();
        for item in inner.db.range(start..end).take(limit) {
            let (k, v) = item.map_err(|e| inner.engine(e))?;
            let bad = || {
                inner.corrupt(format!(
                    "malformed timer key {:?}",
                    String::from_utf8_lossy(&k)
                ))
            };
            if k.len() < TIMER_HEAD + 1 + 8 {
                return Err(bad());
            }
            let fire_at_ms = u64::from_be_bytes(k[5..TIMER_HEAD].try_into().map_err(|_| bad())?);
            if fire_at_ms > now_ms {
                break;
            }
            let key = std::str::from_utf8(&k[TIMER_HEAD..k.len() - 9]).map_err(|_| bad())?;
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

    async fn fire_timer(&self, timer: &Timer, epoch: Epoch) -> Result<Option<Seq>> {
        check_key(&timer.key)?;
        self.inner.open_for_writes()?;
        let timer = timer.clone();
        self.blocking(move |inner| {
            let _owner = inner.hold_epoch(&timer.key, epoch)?;
            // The commit that scheduled the timer must be durable before its message is:
            // otherwise a crash could replay that commit and fire the timer twice.
            inner.flush()?;
            let mut seqs = inner.seqs();
            let range = range_of(&timer.key, inner.ranges);
            let raw_key = timer_key(range, timer.fire_at_ms, &timer.key, timer.id);
            if !inner
                .db
                .contains_key(&raw_key)
                .map_err(|e| inner.engine(e))?
            {
                return Ok(None);
            }
            let origin = Origin::Timer {
                fire_at_ms: timer.fire_at_ms,
                id: timer.id,
            };
            let seq =
                inner.append_moved(&mut seqs, &timer.key, origin, Bytes::from(timer.payload))?;
            inner.db.remove(&raw_key).map_err(|e| inner.engine(e))?;
            Ok(Some(seq))
        })
        .await
    }

    async fn keys_with_pending(&self, range: KeyRange, prefix: &str) -> Result<Vec<String>> {
        let ranges = self.inner.ranges;
        let mut out = Vec::new();
        for (key, last) in self
            .inner
            .inbox
            .keys(|k| k.starts_with(prefix) && range_of(k, ranges) == range)
        {
            if last > self.inner.applied(&key)? {
                out.push(key.to_string());
            }
        }
        Ok(out)
    }

    async fn keys_with_state(&self, ranges: &[KeyRange], prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.to_string();
        let ranges: std::collections::HashSet<KeyRange> = ranges.iter().copied().collect();
        self.blocking(move |inner| {
            // One scan of the prefix, whatever the number of ranges.
            let wanted = |k: &str| {
                k.starts_with(prefix.as_str()) && ranges.contains(&range_of(k, inner.ranges))
            };
            // Staged first: a commit taken for writing is still in the inbox index, which
            // `keys_with_pending` covers, until it is written.
            let mut out: std::collections::BTreeSet<String> = inner
                .staged()
                .keys()
                .filter(|k| wanted(k))
                .map(|k| k.to_string())
                .collect();
            let mut scan = vec![STATE];
            scan.extend_from_slice(prefix.as_bytes());
            for item in inner.db.scan_prefix(scan) {
                let (k, _) = item.map_err(|e| inner.engine(e))?;
                let key = k
                    .get(1..k.len().saturating_sub(1))
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| inner.corrupt("a state key is not a key".into()))?;
                if wanted(key) {
                    out.insert(key.to_string());
                }
            }
            Ok(out.into_iter().collect())
        })
        .await
    }

    async fn discard_dead_letter(&self, key: &str, seq: Seq, epoch: Epoch) -> Result<()> {
        check_key(key)?;
        self.inner.open_for_writes()?;
        let key: Arc<str> = Arc::from(key);
        self.blocking(move |inner| {
            let _owner = inner.hold_epoch(&key, epoch)?;
            let dead_key = seq_key(DEAD, &key, seq);
            match inner.db.remove(&dead_key).map_err(|e| inner.engine(e))? {
                Some(_) => inner.flush(),
                None => Err(Error::NoSuchDeadLetter {
                    key: key.to_string(),
                    seq,
                }),
            }
        })
        .await
    }

    async fn roll(&self) -> Result<()> {
        self.inner.open_for_writes()?;
        self.blocking(|inner| {
            // An append is atomic under the inbox's own lock: no batch is split by a roll.
            if inner.inbox.roll_now()? {
                inner.mark_after_roll();
            }
            Ok(())
        })
        .await
    }

    async fn discard_timers(&self, key: &str, epoch: Epoch) -> Result<u64> {
        check_key(key)?;
        self.inner.open_for_writes()?;
        let key: Arc<str> = Arc::from(key);
        self.blocking(move |inner| {
            let _owner = inner.hold_epoch(&key, epoch)?;
            let range = range_of(&key, inner.ranges);
            let mut named = key.as_bytes().to_vec();
            named.push(0);
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in inner.db.scan_prefix(timer_prefix(range)) {
                let (k, _) = item.map_err(|e| inner.engine(e))?;
                if k.get(TIMER_HEAD..)
                    .is_some_and(|rest| rest.starts_with(&named))
                {
                    batch.remove(k);
                    n += 1;
                }
            }
            if n > 0 {
                inner.db.apply_batch(batch).map_err(|e| inner.engine(e))?;
                inner.flush()?;
            }
            Ok(n)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|inner| {
            inner.flush()?;
            inner.inbox.sync()
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.background.stop();
        self.blocking(|inner| inner.close()).await
    }
}
