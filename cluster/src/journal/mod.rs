//! The journal in Redis: the [`Journal`] backend of a cluster, where every node reads and
//! writes one shared store and ownership of a key range is its epoch in Redis.
//!
//! Every write is one Lua script (see `scripts`), atomic in Redis and in its append-only
//! file, that first checks the writer's epoch against the range's current one: a former
//! owner's late append, commit, dead letter or timer firing is refused
//! ([`Error::Fenced`]), and a commit is also a compare-and-set on the key's applied seq.
//! Durability is the server's: with `appendonly yes` and `appendfsync always` (checked at
//! open unless [`RedisOptions::require_fsync`] is off) a write is on the server's disk before
//! its reply, so [`Journal::flush`] has nothing left to do.
//!
//! Damage is loud: a key whose inbox lacks messages its sequence counter says were
//! appended (a server that lost writes) reads as [`Error::Corrupt`], never as an empty inbox.

mod options;
mod reply;
mod scripts;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use soma_supervision::{
    Append, Commit, DeadLetter, Entry, Epoch, Error, Journal, KeyRange, Result, Seq, Snapshot,
    Timer,
};

pub use self::options::RedisOptions;
use self::reply::{Reply, bulk, int, ints, items};
use crate::Shards;

/// Metric: journal operations against Redis by `op` and `outcome` (`ok`, `fenced`, `error`).
pub const OPS: &str = "soma_journal_redis_ops_total";
/// Metric: the time of one journal operation against Redis, by `op`.
pub const OP_SECONDS: &str = "soma_journal_redis_op_seconds";
/// Metric: messages appended through Redis.
pub const APPENDED: &str = "soma_journal_redis_appended_messages_total";

/// A journal stored in Redis. Cheap to clone; clones share one multiplexed connection.
#[derive(Clone)]
pub struct RedisJournal {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    /// `soma:{<cluster>}`.
    prefix: String,
    /// `redis host:port prefix`, for errors and logs (no credentials).
    at: String,
    node: String,
    ranges: u32,
    max_message_bytes: usize,
    /// The bound on one command, reconnection included.
    timeout: Duration,
    recovered: bool,
    closed: AtomicBool,
    /// In a cluster, ranges are taken and given up through the shard table (under this
    /// node's lease); alone, the journal bumps the epochs itself.
    shards: std::sync::RwLock<Option<Shards>>,
}

impl std::fmt::Debug for RedisJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJournal")
            .field("at", &self.inner.at)
            .field("node", &self.inner.node)
            .field("ranges", &self.inner.ranges)
            .finish_non_exhaustive()
    }
}

/// A failed command of the journal at `at`: its outcome is unknown.
fn backend(at: &str, e: redis::RedisError) -> Error {
    Error::Backend {
        backend: at.to_string(),
        source: Box::new(e),
    }
}

/// Where a URL points, without its credentials.
pub(crate) fn location(url: &str) -> String {
    match redis::Client::open(url) {
        Ok(c) => match &c.get_connection_info().addr {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => {
                format!("{h}:{p}")
            }
            redis::ConnectionAddr::Unix(path) => path.display().to_string(),
        },
        Err(_) => "redis".into(),
    }
}

impl RedisJournal {
    /// Connects, checks the server's persistence settings and records this node's open (a
    /// previous open that never closed is a crash: [`Journal::recovered_from_crash`]).
    #[tracing::instrument(skip_all, fields(cluster = %options.cluster, node = %options.node))]
    pub async fn open(options: RedisOptions) -> Result<Self> {
        options.validate()?;
        let at = format!(
            "redis {} soma:{{{}}}",
            location(&options.url),
            options.cluster
        );
        let backend = |e| backend(&at, e);
        let client = redis::Client::open(options.url.as_str()).map_err(backend)?;
        let timeout = Duration::from_millis(options.timeout_ms);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_max_delay(options.timeout_ms.min(1_000))
            .set_number_of_retries(2);
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        if options.require_fsync {
            for (name, want) in [("appendonly", "yes"), ("appendfsync", "always")] {
                let got: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .map_err(backend)?;
                let value = got.get(1).map(String::as_str).unwrap_or("");
                if value != want {
                    return Err(Error::InvalidOption {
                        key: "journal.redis.require_fsync",
                        reason: format!(
                            "{at} has {name} {value:?}: an acknowledged message could be lost \
                             by a crash of the server; configure `{name} {want}` or turn \
                             journal.redis.require_fsync off"
                        ),
                    });
                }
            }
        }
        let prefix = format!("soma:{{{}}}", options.cluster);
        let before: Option<String> = redis::cmd("SET")
            .arg(format!("{prefix}:open:{}", options.node))
            .arg("1")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let recovered = before.is_some();
        tracing::info!(at = %at, recovered, "redis journal opened");
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                prefix,
                at,
                node: options.node,
                ranges: options.ranges,
                max_message_bytes: options.max_message_bytes,
                timeout,
                recovered,
                closed: AtomicBool::new(false),
                shards: std::sync::RwLock::new(None),
            }),
        })
    }

    /// Opens the journal of a cluster node: ranges are acquired and released through
    /// `shards` (a compare-and-set under the node's lease, refused while another live
    /// incarnation holds the shard), whose epochs are the ones every write is fenced by.
    /// `options.cluster` must be the cluster of `shards`.
    pub async fn open_in_cluster(options: RedisOptions, shards: Shards) -> Result<Self> {
        let journal = Self::open(options).await?;
        journal.use_shards(shards);
        Ok(journal)
    }

    /// The shard table ranges are taken through, in a cluster.
    fn shards(&self) -> Option<Shards> {
        self.inner
            .shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes ranges through `shards` from now on: the node joined again as a new
    /// incarnation (its earlier one lost its lease).
    pub(crate) fn use_shards(&self, shards: Shards) {
        *self.inner.shards.write().unwrap_or_else(|p| p.into_inner()) = Some(shards);
    }

    fn cluster_error(&self, e: crate::Error, range: KeyRange) -> Error {
        match e {
            crate::Error::NotHolder { shard, epoch } => Error::Fenced {
                key: shard.to_string(),
                reason: soma_supervision::Fence::StaleEpoch {
                    range: shard,
                    epoch,
                    current: None,
                },
            },
            // Definite refusals, not failures of unknown outcome.
            crate::Error::ShardHeld { shard, .. } => Error::NotOwned {
                key: shard.to_string(),
                range: shard,
            },
            crate::Error::LeaseLost { .. } => Error::Fenced {
                key: range.to_string(),
                reason: soma_supervision::Fence::LeaseExpired { range },
            },
            crate::Error::Redis(_) | crate::Error::BadMember { .. } => Error::Backend {
                backend: self.inner.at.clone(),
                source: Box::new(e),
            },
            other => Error::Backend {
                backend: format!("{} shard table", self.inner.at),
                source: Box::new(other),
            },
        }
    }

    fn backend(&self, e: redis::RedisError) -> Error {
        backend(&self.inner.at, e)
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            path: PathBuf::from(&self.inner.at),
            detail,
        }
    }

    fn open_for_writes(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Stopped { what: "journal" });
        }
        Ok(())
    }

    /// Bounds one command by the journal's timeout, reconnection included (a connection
    /// being re-established after a restart of the server must not hold a caller forever).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "journal command timed out",
            ))),
        }
    }

    /// Runs `inv`, timing it and counting its outcome under `op`.
    async fn run(
        &self,
        op: &'static str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<redis::Value> {
        let started = Instant::now();
        let result = self
            .bounded(inv.invoke_async(&mut self.inner.conn.clone()))
            .await;
        metrics::histogram!(OP_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                metrics::counter!(OPS, "op" => op, "outcome" => "error").increment(1);
                tracing::warn!(op, error = %e, "redis journal operation failed");
                Err(self.backend(e))
            }
        }
    }

    /// Runs a writing script and reads its status: `Some(rest)` for `ok`, `None` for `gone`
    /// (no such dead letter, a timer already fired), the typed refusal otherwise (`key`
    /// names the key for fences, `from` the first seq the write covers).
    async fn write(
        &self,
        op: &'static str,
        key: &str,
        from: Seq,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<Option<Vec<redis::Value>>> {
        self.open_for_writes()?;
        let value = self.run(op, inv).await?;
        let corrupt = |d: String| self.corrupt(format!("{op} of {key}: {d}"));
        let reply = Reply::parse(value).map_err(corrupt)?;
        let outcome = match reply {
            Reply::Ok(_) | Reply::Gone => "ok",
            _ => "fenced",
        };
        metrics::counter!(OPS, "op" => op, "outcome" => outcome).increment(1);
        reply.into_result(key, from, corrupt)
    }

    /// [`write`](Self::write) of a script that never answers `gone`.
    async fn write_ok(
        &self,
        op: &'static str,
        key: &str,
        from: Seq,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<redis::Value>> {
        self.write(op, key, from, inv)
            .await?
            .ok_or_else(|| self.corrupt(format!("{op} of {key}: an unexpected 'gone'")))
    }

    /// The number a writing script answered after its status, if any.
    fn first_int(&self, rest: &[redis::Value], what: &str) -> Result<Option<i64>> {
        rest.first()
            .map(int)
            .transpose()
            .map_err(|d| self.corrupt(format!("{what}: {d}")))
    }

    fn invocation(&self, script: &'static redis::Script) -> redis::ScriptInvocation<'static> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.inner.prefix);
        inv
    }

    fn range_arg(&self, key: &str) -> u32 {
        self.range_of(key).0
    }

    async fn take_dead_letter(
        &self,
        key: &str,
        seq: Seq,
        epoch: Epoch,
        again: bool,
    ) -> Result<Vec<redis::Value>> {
        let mut inv = self.invocation(&scripts::TAKE_DEAD_LETTER);
        inv.arg(self.range_arg(key))
            .arg(epoch)
            .arg(key)
            .arg(seq)
            .arg(if again { "1" } else { "0" });
        let op = if again {
            "redrive"
        } else {
            "discard_dead_letter"
        };
        self.write(op, key, seq, &inv)
            .await?
            .ok_or_else(|| Error::NoSuchDeadLetter {
                key: key.to_string(),
                seq,
            })
    }

    async fn members(&self, set: String, prefix: &str) -> Result<Vec<String>> {
        let raw: Vec<Vec<u8>> = self
            .bounded(
                redis::cmd("SMEMBERS")
                    .arg(set)
                    .query_async(&mut self.inner.conn.clone()),
            )
            .await
            .map_err(|e| self.backend(e))?;
        let mut keys = Vec::with_capacity(raw.len());
        for k in raw {
            let k =
                String::from_utf8(k).map_err(|_| self.corrupt("a key that is not UTF-8".into()))?;
            if k.starts_with(prefix) {
                keys.push(k);
            }
        }
        keys.sort_unstable();
        Ok(keys)
    }
}

#[async_trait]
impl Journal for RedisJournal {
    fn ranges(&self) -> u32 {
        self.inner.ranges
    }

    fn recovered_from_crash(&self) -> bool {
        self.inner.recovered
    }

    async fn acquire(&self, range: KeyRange) -> Result<Epoch> {
        let epochs = self.acquire_many(&[range]).await?;
        epochs
            .first()
            .copied()
            .ok_or_else(|| self.corrupt("acquire answered no epoch".into()))
    }

    #[tracing::instrument(skip_all, fields(ranges = ranges.len()))]
    async fn acquire_many(&self, ranges: &[KeyRange]) -> Result<Vec<Epoch>> {
        self.open_for_writes()?;
        let mut out = Vec::with_capacity(ranges.len());
        if let Some(shards) = self.shards() {
            for r in ranges {
                let (epoch, _) = shards
                    .acquire(*r)
                    .await
                    .map_err(|e| self.cluster_error(e, *r))?;
                out.push(epoch);
            }
            return Ok(out);
        }
        for chunk in ranges.chunks(1024) {
            let mut inv = self.invocation(&scripts::ACQUIRE);
            inv.arg(&self.inner.node);
            for r in chunk {
                inv.arg(r.0);
            }
            let value = self.run("acquire", &inv).await?;
            let epochs = items(value).and_then(|v| ints(&v));
            out.extend(
                epochs
                    .map_err(|d| self.corrupt(format!("acquire: {d}")))?
                    .into_iter()
                    .map(|e| e as Epoch),
            );
        }
        if out.len() != ranges.len() {
            return Err(self.corrupt(format!(
                "acquire of {} ranges answered {}",
                ranges.len(),
                out.len()
            )));
        }
        Ok(out)
    }

    async fn release(&self, range: KeyRange, epoch: Epoch) -> Result<()> {
        if let Some(shards) = self.shards() {
            return shards
                .release(range, epoch)
                .await
                .map_err(|e| self.cluster_error(e, range));
        }
        let mut inv = self.invocation(&scripts::RELEASE);
        inv.arg(range.0).arg(epoch);
        self.write_ok("release", &range.to_string(), 0, &inv)
            .await
            .map(|_| ())
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<Seq>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for a in batch {
            if a.payload.len() > self.inner.max_message_bytes {
                return Err(Error::TooLarge {
                    key: a.key.to_string(),
                    bytes: a.payload.len(),
                    limit: self.inner.max_message_bytes,
                });
            }
        }
        let mut inv = self.invocation(&scripts::APPEND);
        inv.arg(batch.len());
        for a in batch {
            inv.arg(self.range_arg(&a.key))
                .arg(a.epoch)
                .arg(&*a.key)
                .arg(&a.payload[..]);
        }
        let first = &batch[0].key;
        let rest = self.write_ok("append", first, 0, &inv).await?;
        let seqs: Vec<Seq> = ints(&rest)
            .map_err(|d| self.corrupt(format!("append: {d}")))?
            .into_iter()
            .map(|i| i as Seq)
            .collect();
        if seqs.len() != batch.len() {
            return Err(self.corrupt(format!(
                "append of {} answered {} seqs",
                batch.len(),
                seqs.len()
            )));
        }
        metrics::counter!(APPENDED).increment(batch.len() as u64);
        Ok(seqs)
    }

    async fn load(&self, key: &str) -> Result<Snapshot> {
        let (applied, state): (Option<u64>, Option<Vec<u8>>) = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(format!("{}:k:{key}", self.inner.prefix))
                    .arg("applied")
                    .arg("state")
                    .query_async(&mut self.inner.conn.clone()),
            )
            .await
            .map_err(|e| self.backend(e))?;
        Ok(Snapshot {
            applied: applied.unwrap_or(0),
            state,
        })
    }

    async fn pending(&self, key: &str, from: Seq, limit: usize) -> Result<Vec<Entry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::PENDING);
        inv.arg(key).arg(from).arg(limit);
        let value = self.run("pending", &inv).await?;
        let bad = |d: String| self.corrupt(format!("inbox of {key}: {d}"));
        let v = items(value).map_err(&bad)?;
        let (applied, last) = match v.get(..2) {
            Some([a, l]) => (int(a).map_err(&bad)? as Seq, int(l).map_err(&bad)? as Seq),
            _ => return Err(bad("a short reply".into())),
        };
        let start = from.max(applied + 1);
        let mut out = Vec::with_capacity((v.len() - 2) / 2);
        for pair in v[2..].chunks(2) {
            let [id, payload] = pair else {
                return Err(bad("an odd reply".into()));
            };
            let id = bulk(id).map_err(&bad)?;
            let seq = std::str::from_utf8(&id)
                .ok()
                .and_then(|s| s.strip_prefix("0-"))
                .and_then(|s| s.parse::<Seq>().ok())
                .ok_or_else(|| bad(format!("entry id {:?}", String::from_utf8_lossy(&id))))?;
            let expected = start + out.len() as Seq;
            if seq != expected {
                return Err(bad(format!(
                    "seq {expected} is missing (found {seq}; applied {applied}, last appended {last})"
                )));
            }
            out.push(Entry {
                seq,
                payload: bulk(payload).map_err(&bad)?.into(),
            });
        }
        // Fewer entries than asked for must mean the inbox ended at `last`.
        let end = start + out.len() as Seq;
        if out.len() < limit && start <= last && end <= last {
            return Err(bad(format!(
                "seqs {end}..={last} are missing (applied {applied}): the server lost writes"
            )));
        }
        Ok(out)
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        let mut inv = self.invocation(&scripts::COMMIT);
        inv.arg(self.range_arg(&commit.key))
            .arg(commit.epoch)
            .arg(&*commit.key)
            .arg(commit.from)
            .arg(commit.seq)
            .arg(&commit.state[..]);
        for (i, t) in commit.timers.iter().enumerate() {
            // Deterministic per (seq, index), as the sled journal numbers them.
            let id = (commit.seq << 16) | (i as u64 & 0xffff);
            inv.arg(t.fire_at_ms)
                .arg(format!("{id}:{}", commit.key))
                .arg(&t.payload[..]);
        }
        self.write_ok("commit", &commit.key, commit.from, &inv)
            .await
            .map(|_| ())
    }

    async fn record_failure(&self, key: &str, seq: Seq) -> Result<u32> {
        let mut inv = self.invocation(&scripts::FAILURE);
        inv.arg(key).arg(seq);
        let v = self.run("record_failure", &inv).await?;
        let n = int(&v).map_err(|d| self.corrupt(format!("failure count of {key}: {d}")))?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn begin_replays(&self, keys: &[(Arc<str>, Seq)]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(512) {
            let mut inv = self.invocation(&scripts::REPLAYS);
            for (k, seq) in chunk {
                inv.arg(&**k).arg(*seq);
            }
            let v = self.run("begin_replays", &inv).await?;
            let same = items(v).and_then(|v| ints(&v));
            out.extend(
                same.map_err(|d| self.corrupt(format!("begin_replays: {d}")))?
                    .into_iter()
                    .map(|x| x == 1),
            );
        }
        Ok(out)
    }

    async fn dead_letter(
        &self,
        key: &str,
        seq: Seq,
        error: &str,
        attempts: u32,
        epoch: Epoch,
    ) -> Result<()> {
        let mut inv = self.invocation(&scripts::DEAD_LETTER);
        inv.arg(self.range_arg(key))
            .arg(epoch)
            .arg(key)
            .arg(seq)
            .arg(error)
            .arg(attempts)
            .arg(crate::membership::now_ms());
        self.write_ok("dead_letter", key, seq, &inv)
            .await
            .map(|_| ())
    }

    async fn dead_letters(&self, prefix: &str) -> Result<Vec<DeadLetter>> {
        let mut inv = self.invocation(&scripts::DEAD_LETTERS);
        inv.arg(prefix);
        let v = self.run("dead_letters", &inv).await?;
        reply::dead_letters(v).map_err(|d| self.corrupt(format!("dead letters: {d}")))
    }

    async fn redrive(&self, key: &str, seq: Seq, epoch: Epoch) -> Result<Seq> {
        let rest = self.take_dead_letter(key, seq, epoch, true).await?;
        self.first_int(&rest, &format!("redrive of {key}"))?
            .map(|s| s as Seq)
            .ok_or_else(|| self.corrupt(format!("redrive of {key} answered no seq")))
    }

    async fn next_timer(&self, range: KeyRange) -> Result<Option<u64>> {
        let first: Vec<(Vec<u8>, f64)> = self
            .bounded(
                redis::cmd("ZRANGE")
                    .arg(format!("{}:tm:{}", self.inner.prefix, range.0))
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES")
                    .query_async(&mut self.inner.conn.clone()),
            )
            .await
            .map_err(|e| self.backend(e))?;
        Ok(first.first().map(|(_, at)| *at as u64))
    }

    async fn due_timers(&self, range: KeyRange, now_ms: u64, limit: usize) -> Result<Vec<Timer>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::DUE);
        inv.arg(range.0).arg(now_ms).arg(limit);
        let v = self.run("due_timers", &inv).await?;
        reply::timers(v).map_err(|d| self.corrupt(format!("timers of {range}: {d}")))
    }

    async fn fire_timer(&self, timer: &Timer, epoch: Epoch) -> Result<Option<Seq>> {
        let mut inv = self.invocation(&scripts::FIRE);
        inv.arg(self.range_arg(&timer.key))
            .arg(epoch)
            .arg(&*timer.key)
            .arg(format!("{}:{}", timer.id, timer.key));
        let Some(rest) = self.write("fire_timer", &timer.key, 0, &inv).await? else {
            return Ok(None);
        };
        self.first_int(&rest, &format!("fire_timer of {}", timer.key))?
            .map(|s| Some(s as Seq))
            .ok_or_else(|| self.corrupt(format!("fire_timer of {} answered no seq", timer.key)))
    }

    async fn keys_with_pending(&self, range: KeyRange, prefix: &str) -> Result<Vec<String>> {
        self.members(format!("{}:pend:{}", self.inner.prefix, range.0), prefix)
            .await
    }

    async fn keys_with_state(&self, ranges: &[KeyRange], prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for r in ranges {
            out.extend(
                self.members(format!("{}:stated:{}", self.inner.prefix, r.0), prefix)
                    .await?,
            );
        }
        out.sort_unstable();
        Ok(out)
    }

    async fn discard_dead_letter(&self, key: &str, seq: Seq, epoch: Epoch) -> Result<()> {
        self.take_dead_letter(key, seq, epoch, false)
            .await
            .map(|_| ())
    }

    async fn roll(&self) -> Result<()> {
        // Acknowledged messages leave Redis with the commit that acknowledges them.
        Ok(())
    }

    async fn discard_timers(&self, key: &str, epoch: Epoch) -> Result<u64> {
        let mut inv = self.invocation(&scripts::DISCARD_TIMERS);
        inv.arg(self.range_arg(key)).arg(epoch).arg(key);
        let rest = self.write_ok("discard_timers", key, 0, &inv).await?;
        Ok(self
            .first_int(&rest, &format!("discard_timers of {key}"))?
            .unwrap_or(0) as u64)
    }

    async fn flush(&self) -> Result<()> {
        // Every write was on the server's disk before it was answered (appendfsync always).
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _: () = self
            .bounded(
                redis::cmd("DEL")
                    .arg(format!("{}:open:{}", self.inner.prefix, self.inner.node))
                    .query_async(&mut self.inner.conn.clone()),
            )
            .await
            .map_err(|e| self.backend(e))?;
        tracing::info!(at = %self.inner.at, "redis journal closed");
        Ok(())
    }
}
