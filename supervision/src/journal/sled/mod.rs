//! The embedded journal: an append-only segment log for the inbox (see `inbox`) and sled for
//! everything keyed (committed states, failure counts, dead letters, timers).

mod layout;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use self::layout::{
    DEAD, EPOCH_KEY, FAILURES, FORMAT, FORMAT_KEY, Marker, STATE, TIMER, check_key, engine_error,
    inbox_dir, key_prefix, read_marker, seq_key, state_dir, tail_seq, timer_key, write_marker,
};
use super::inbox::{Inbox, Origin};
use super::{Append, Bytes, Commit, DeadLetter, Entry, Journal, Seq, Snapshot, Timer};
use crate::codec::{decode, encode, seal, unseal};
use crate::error::{Error, Result, panic_text};

const MARKER_EVERY: Duration = Duration::from_millis(1000);
/// How often staged commits are written and flushed when no append carries them.
const COMMIT_EVERY: Duration = Duration::from_millis(50);
const SEQ_CACHE_LIMIT: usize = 100_000;

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

/// The embedded [`Journal`]: inbox in a segment log, states and the rest in sled.
#[derive(Debug, Clone)]
pub struct SledJournal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    inbox: Inbox,
    path: PathBuf,
    durability: Durability,
    /// The last sequence number assigned per key; a cache, rebuilt on a miss. Held while
    /// assigning and appending so that sequence numbers have no gaps.
    seqs: Mutex<HashMap<Arc<str>, Seq>>,
    /// State-store flush epoch: stored with every flush, durable once the flush returns.
    epoch: AtomicU64,
    /// What the marker file says.
    marked: Mutex<Marker>,
    /// Serialises state-store flushes so that epochs become durable in order.
    flush_lock: Mutex<()>,
    /// Serialises writes of staged commits (taken after `flush_lock` when both are held).
    commit_lock: Mutex<()>,
    /// Commits not yet written to the state store.
    staged: Mutex<HashMap<Arc<str>, StagedCommit>>,
}

/// A commit waiting to be written: the latest per key, so that many commits of one key
/// between two writes cost one. Reads consult it first.
#[derive(Debug)]
struct StagedCommit {
    applied: Seq,
    state: Option<Vec<u8>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let closed = self
            .flush()
            .and_then(|()| self.inbox.sync())
            .and_then(|()| self.mark());
        if let Err(e) = closed {
            tracing::error!(path = %self.path.display(), error = %e, "closing the journal failed");
        }
    }
}

impl SledJournal {
    /// Opens (or creates) the journal. A damaged, truncated or foreign directory is an
    /// [`Error::Corrupt`] naming the path, never a panic and never a silent loss: every
    /// record is checksummed, and the marker file remembers what was durable, so a journal
    /// that recovers to less has lost data and says so.
    pub fn open(options: SledOptions) -> Result<Self> {
        options.validate()?;
        let path = options.path.clone();
        let marked = read_marker(&path)?;
        let db = open_state_store(&path, options.cache_capacity_bytes)?;
        let corrupt = |detail: String| Error::Corrupt {
            path: path.clone(),
            detail,
        };
        let engine = |e| engine_error(&state_dir(&path), e);
        let epoch = match db.get(FORMAT_KEY).map_err(engine)? {
            Some(v) if v.as_ref() == FORMAT => match db.get(EPOCH_KEY).map_err(engine)? {
                Some(e) => u64::from_be_bytes(
                    e.as_ref()
                        .try_into()
                        .map_err(|_| corrupt("malformed epoch record".into()))?,
                ),
                None => 0,
            },
            Some(v) => {
                return Err(corrupt(format!(
                    "unsupported journal format {:?}",
                    String::from_utf8_lossy(&v)
                )));
            }
            None if marked.is_none() && db.is_empty() => {
                db.insert(FORMAT_KEY, FORMAT).map_err(engine)?;
                db.flush().map_err(engine)?;
                0
            }
            None => {
                return Err(corrupt(
                    "format record is missing: the journal was truncated or damaged".into(),
                ));
            }
        };
        let marker = marked.unwrap_or_default();
        if epoch < marker.epoch {
            return Err(corrupt(format!(
                "state store recovered to flush epoch {epoch} but epoch {} was durable: data \
                 was lost (truncated or damaged)",
                marker.epoch
            )));
        }
        let started = Instant::now();
        let (inbox, unfinished) = Inbox::open(&inbox_dir(&path), marker.log, |key| {
            Ok(read_snapshot(&db, &path, key)?.applied)
        })?;
        let inner = Arc::new(Inner {
            db,
            inbox,
            path,
            durability: options.durability,
            seqs: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(epoch),
            marked: Mutex::new(marker),
            flush_lock: Mutex::new(()),
            commit_lock: Mutex::new(()),
            staged: Mutex::new(HashMap::new()),
        });
        inner.finish_moves(&unfinished)?;
        // The marker must name the new active segment before anything can be deleted.
        inner.flush()?;
        inner.mark()?;
        tracing::info!(
            path = %inner.path.display(),
            durability = ?options.durability,
            epoch,
            recovery_ms = started.elapsed().as_millis() as u64,
            "journal opened"
        );
        spawn_background(Arc::downgrade(&inner), options.durability);
        Ok(Self { inner })
    }

    /// The journal directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

fn open_state_store(path: &Path, cache: u64) -> Result<sled::Db> {
    let dir = state_dir(path);
    let config = sled::Config::new()
        .path(&dir)
        .cache_capacity(cache)
        .flush_every_ms(None);
    match std::panic::catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(engine_error(&dir, e)),
        Err(panic) => Err(Error::Corrupt {
            path: dir,
            detail: format!("storage engine failed to open: {}", panic_text(&*panic)),
        }),
    }
}

fn read_snapshot(db: &sled::Db, path: &Path, key: &str) -> Result<Snapshot> {
    let raw_key = key_prefix(STATE, key);
    let Some(record) = db
        .get(&raw_key)
        .map_err(|e| engine_error(&state_dir(path), e))?
    else {
        return Ok(Snapshot::default());
    };
    let corrupt = |detail: String| Error::Corrupt {
        path: state_dir(path),
        detail,
    };
    let body =
        unseal(&record).ok_or_else(|| corrupt(format!("checksum mismatch in state of {key}")))?;
    let (applied, rest) = body
        .split_at_checked(8)
        .ok_or_else(|| corrupt(format!("state record of {key} is too short")))?;
    let applied = u64::from_be_bytes(applied.try_into().unwrap_or([0; 8]));
    let state = match rest.split_first() {
        Some((1, s)) => Some(s.to_vec()),
        Some((0, _)) => None,
        _ => return Err(corrupt(format!("state record of {key} is malformed"))),
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

/// Keeps the marker current, flushes in periodic mode, writes staged commits.
fn spawn_background(inner: Weak<Inner>, durability: Durability) {
    let spawned = std::thread::Builder::new()
        .name("soma-journal".into())
        .spawn(move || {
            let mut last_mark = Instant::now();
            let mut last_sync = Instant::now();
            let sync_every = match durability {
                Durability::FlushPerBatch => None,
                Durability::Periodic { interval_ms } => Some(Duration::from_millis(interval_ms)),
            };
            loop {
                std::thread::sleep(COMMIT_EVERY.min(sync_every.unwrap_or(COMMIT_EVERY)));
                let Some(inner) = inner.upgrade() else { return };
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
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the journal thread");
    }
}

impl Inner {
    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            path: state_dir(&self.path),
            detail,
        }
    }

    fn engine(&self, e: sled::Error) -> Error {
        engine_error(&state_dir(&self.path), e)
    }

    fn unseal<'a>(&self, what: &str, raw_key: &[u8], record: &'a [u8]) -> Result<&'a [u8]> {
        unseal(record).ok_or_else(|| {
            self.corrupt(format!(
                "checksum mismatch in {what} record {:?}",
                String::from_utf8_lossy(raw_key)
            ))
        })
    }

    fn staged(&self) -> MutexGuard<'_, HashMap<Arc<str>, StagedCommit>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self, key: &str) -> Result<Snapshot> {
        if let Some(c) = self.staged().get(key) {
            return Ok(Snapshot {
                applied: c.applied,
                state: c.state.clone(),
            });
        }
        read_snapshot(&self.db, &self.path, key)
    }

    /// The last sequence number used by `key`.
    fn last_seq(&self, seqs: &mut HashMap<Arc<str>, Seq>, key: &Arc<str>) -> Result<Seq> {
        if let Some(s) = seqs.get(key) {
            return Ok(*s);
        }
        let last = match self.inbox.last_seq(key) {
            Some(s) => s.max(self.snapshot(key)?.applied),
            None => self.snapshot(key)?.applied,
        };
        if seqs.len() >= SEQ_CACHE_LIMIT {
            seqs.clear();
        }
        seqs.insert(key.clone(), last);
        Ok(last)
    }

    fn seqs(&self) -> MutexGuard<'_, HashMap<Arc<str>, Seq>> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, batch: &[Append]) -> Result<Vec<Seq>> {
        let mut seqs = self.seqs();
        let mut assigned: HashMap<Arc<str>, Seq> = HashMap::new();
        let mut entries = Vec::with_capacity(batch.len());
        for a in batch {
            check_key(&a.key)?;
            let last = match assigned.get(&a.key) {
                Some(s) => *s,
                None => self.last_seq(&mut seqs, &a.key)?,
            };
            assigned.insert(a.key.clone(), last + 1);
            entries.push((a.key.clone(), last + 1, Origin::Send, a.payload.clone()));
        }
        let sync = self.durability == Durability::FlushPerBatch;
        let started = Instant::now();
        self.inbox.append(&entries, sync)?;
        if sync {
            crate::metrics::journal_flushed(started.elapsed());
        }
        seqs.extend(assigned);
        Ok(entries.iter().map(|e| e.1).collect())
    }

    /// Appends one message moved from elsewhere (a dead letter, a timer), durably.
    fn append_moved(
        &self,
        seqs: &mut HashMap<Arc<str>, Seq>,
        key: &Arc<str>,
        origin: Origin,
        payload: Bytes,
    ) -> Result<Seq> {
        let seq = self.last_seq(seqs, key)? + 1;
        self.inbox
            .append(&[(key.clone(), seq, origin, payload)], true)?;
        seqs.insert(key.clone(), seq);
        Ok(seq)
    }

    /// Writes staged commits to the state store and drops what they acknowledge from the
    /// inbox index. `extra` adds to the same atomic batch and may override staged commits (a
    /// dead letter, a commit with timers). Serialised from the take to the acks: a write
    /// that took older commits can never land after one that took newer ones.
    fn write_staged(
        &self,
        extra: impl FnOnce(&mut HashMap<Arc<str>, StagedCommit>, &mut sled::Batch) -> Result<()>,
    ) -> Result<()> {
        let _serial = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // The staged lock is held until the batch is in the state store: a reader never sees
        // a commit neither staged nor written (it would read an older state and skip).
        let mut current = self.staged();
        let mut taken = std::mem::take(&mut *current);
        let mut write = sled::Batch::default();
        let written = extra(&mut taken, &mut write).and_then(|()| {
            for (key, c) in &taken {
                write.insert(
                    key_prefix(STATE, key),
                    state_record(c.applied, c.state.as_deref()),
                );
            }
            self.db.apply_batch(write).map_err(|e| self.engine(e))
        });
        if let Err(e) = written {
            // Nothing written: put back what was taken (no newer commit can have arrived:
            // the lock was held).
            *current = taken;
            return Err(e);
        }
        drop(current);
        for (key, c) in taken {
            self.inbox.ack(&key, c.applied);
        }
        Ok(())
    }

    /// The committed state of `key`, seen from inside [`Inner::write_staged`] (which holds
    /// the staged lock: everything staged is in `taken`).
    fn snapshot_in(&self, taken: &HashMap<Arc<str>, StagedCommit>, key: &str) -> Result<Snapshot> {
        match taken.get(key) {
            Some(c) => Ok(Snapshot {
                applied: c.applied,
                state: c.state.clone(),
            }),
            None => read_snapshot(&self.db, &self.path, key),
        }
    }

    /// Writes staged commits and flushes the state store, then deletes inbox segments that
    /// only held messages acknowledged before this flush.
    fn flush(&self) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.write_staged(|_, _| Ok(()))?;
        let emptied = self.inbox.take_emptied();
        let result = self.flush_then_delete(&emptied);
        if result.is_err() {
            // Deleted later, after a flush that works.
            self.inbox.restore_emptied(emptied);
        }
        result
    }

    fn flush_then_delete(&self, emptied: &[u64]) -> Result<()> {
        let next = self.epoch.load(Ordering::Acquire) + 1;
        self.db
            .insert(EPOCH_KEY, &next.to_be_bytes())
            .map_err(|e| self.engine(e))?;
        self.db.flush().map_err(|e| self.engine(e))?;
        self.epoch.store(next, Ordering::Release);
        if !emptied.is_empty() {
            // The marker must not name a segment about to go.
            self.mark()?;
            self.inbox.delete(emptied)?;
        }
        Ok(())
    }

    fn flush_if_staged(&self) -> Result<()> {
        if self.staged().is_empty() {
            return Ok(());
        }
        self.flush()
    }

    /// Records the durable epoch and log position in the marker file if they moved.
    fn mark(&self) -> Result<()> {
        // Read the position under the lock, and never move backwards: a stale position
        // written after a newer one could name a segment already deleted.
        let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Marker {
            epoch: self.epoch.load(Ordering::Acquire).max(marked.epoch),
            log: Some(self.inbox.durable_position()).max(marked.log),
        };
        if *marked != now {
            write_marker(&self.path, now)?;
            *marked = now;
        }
        Ok(())
    }

    /// A crash between appending a moved message and removing its source leaves both:
    /// finish the move by removing the source.
    fn finish_moves(&self, unfinished: &[(Arc<str>, Origin)]) -> Result<()> {
        if unfinished.is_empty() {
            return Ok(());
        }
        let mut write = sled::Batch::default();
        for (key, origin) in unfinished {
            match origin {
                Origin::Send => {}
                Origin::Redrive { seq } => write.remove(seq_key(DEAD, key, *seq)),
                Origin::Timer { fire_at_ms, id } => write.remove(timer_key(*fire_at_ms, key, *id)),
            }
        }
        self.db.apply_batch(write).map_err(|e| self.engine(e))
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
        let from = from.max(self.inner.snapshot(key)?.applied + 1);
        self.inner.inbox.pending(key, from, limit)
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        check_key(&commit.key)?;
        let inner = &self.inner;
        // The state record, holding the applied seq, is the commit point. It is staged and
        // written with other commits by the journal thread (or the next flush): one state
        // store batch for many commits, one state write per key however many messages it
        // handled in between. A commit lost in a crash is replayed: its messages are in the
        // inbox until the commit is durable.
        if commit.timers.is_empty() {
            inner.staged().insert(
                commit.key.clone(),
                StagedCommit {
                    applied: commit.seq,
                    state: Some(commit.state),
                },
            );
            return Ok(());
        }
        // Timers must be visible to the timer task at once, and atomic with their state:
        // one batch with both.
        let Commit {
            key,
            seq,
            state,
            timers,
            ..
        } = commit;
        self.blocking(move |inner| {
            inner.write_staged(|taken, write| {
                for (i, t) in timers.iter().enumerate() {
                    // Deterministic id: a replayed commit rewrites the same timer.
                    let id = (seq << 16) | (i as u64 & 0xffff);
                    write.insert(timer_key(t.fire_at_ms, &key, id), seal(&t.payload));
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
        let Some(payload) = inner.inbox.payload(key, seq)? else {
            return Err(inner.corrupt(format!("dead-lettering {key} seq {seq}: not in the inbox")));
        };
        let letter = DeadLetter {
            key: key.to_string(),
            seq,
            payload: payload.to_vec(),
            error: error.to_string(),
            attempts,
            at_ms: crate::timers::now_ms(),
        };
        let record = seal(&encode("dead letter", &letter)?);
        let key_arc: Arc<str> = Arc::from(key);
        // One batch: the dead letter exists if and only if the message is acknowledged. The
        // state stays; the applied seq moves past the dead message.
        inner.write_staged(|taken, write| {
            let snapshot = inner.snapshot_in(taken, key)?;
            write.insert(seq_key(DEAD, key, seq), record);
            write.remove(key_prefix(FAILURES, key));
            taken.insert(
                key_arc,
                StagedCommit {
                    applied: seq.max(snapshot.applied),
                    state: snapshot.state,
                },
            );
            Ok(())
        })?;
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
        let key: Arc<str> = Arc::from(key);
        self.blocking(move |inner2| {
            let mut seqs = inner2.seqs();
            let dead_key = seq_key(DEAD, &key, seq);
            let Some(record) = inner2.db.get(&dead_key).map_err(|e| inner2.engine(e))? else {
                return Err(Error::NoSuchDeadLetter {
                    key: key.to_string(),
                    seq,
                });
            };
            let body = inner2.unseal("dead letter", &dead_key, &record)?;
            let letter: DeadLetter =
                decode("dead letter", body).map_err(|e| inner2.corrupt(e.to_string()))?;
            // Append first (durably), then remove the dead letter; a crash in between is
            // finished at the next open (the appended record names its origin).
            let new_seq = inner2.append_moved(
                &mut seqs,
                &key,
                Origin::Redrive { seq },
                Bytes::from(letter.payload),
            )?;
            inner2.db.remove(&dead_key).map_err(|e| inner2.engine(e))?;
            Ok(new_seq)
        })
        .await
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
            let key = std::str::from_utf8(&k[9..k.len() - 9]).map_err(|_| bad())?;
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
        let timer = timer.clone();
        self.blocking(move |inner| {
            // The commit that scheduled the timer must be durable before its message is:
            // otherwise a crash could replay that commit and fire the timer twice.
            inner.flush()?;
            let mut seqs = inner.seqs();
            let raw_key = timer_key(timer.fire_at_ms, &timer.key, timer.id);
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

    async fn keys_with_pending(&self, prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (key, last) in self.inner.inbox.keys(prefix) {
            if last > self.inner.snapshot(&key)?.applied {
                out.push(key.to_string());
            }
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|inner| {
            inner.flush()?;
            inner.inbox.sync()
        })
        .await
    }
}
