//! Cluster membership in Redis: a lease per node, incarnations, node states, and a node that
//! stops serving before anyone else may take its shards.
//!
//! Orleans keeps its membership table in an external store; so does this. Under
//! `soma:{<cluster>}:` Redis holds
//! - `members`: a hash, node name -> [`Member`] as JSON (the table every node reads);
//! - `incarnation:<node>`: a counter, bumped by every start of a node under that name;
//! - `lease:<node>`: the live incarnation, set with a time to live of [`Options::lease`] and
//!   renewed every [`Options::renew`] by a compare-and-set script (only the incarnation that
//!   holds it can renew it, change its state or drop it);
//! - the channel `events`, where every change of the table is published.
//!
//! A node whose renewals fail stops serving at `sent + lease - clock_bound`, where `sent` is
//! its clock reading before it sent the last renewal that succeeded. Redis set that
//! renewal's expiry after `sent`, so the key outlives the node's deadline as long as the two
//! clocks drift apart by less than `clock_bound` over one lease; only then can another node
//! see the lease gone, mark the node down and take its shards. `docs/semantics.md` states
//! this as the cluster's promise.

pub(crate) mod scripts;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{Error, NodeName, Result};

/// Metric: members by state (`state`), as this node last read the table.
pub const NODES: &str = "soma_cluster_nodes";
/// Metric: lease renewals by `outcome` (`renewed`, `failed`, `lost`).
pub const RENEWALS: &str = "soma_cluster_lease_renewals_total";
/// Metric: members this node marked down after their lease expired.
pub const MARKED_DOWN: &str = "soma_cluster_marked_down_total";

/// A member's state in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Registered, not yet owning shards.
    Joining,
    /// Owns its share of the shards.
    Up,
    /// Handing off its shards before it leaves.
    Draining,
    /// Gone from the placement, about to drop its lease.
    Leaving,
    /// Left, or its lease expired.
    Down,
}

impl NodeState {
    /// The state's name, as the table and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Leaving => "leaving",
            Self::Down => "down",
        }
    }
}

/// One row of the membership table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name.
    pub name: NodeName,
    /// Which start of the node under that name (strictly increasing).
    pub incarnation: u64,
    /// Its state.
    pub state: NodeState,
    /// Where its node link listens (`host:port`).
    pub addr: String,
    /// When the state was set, Unix milliseconds (the writer's clock; for operators only).
    pub since_ms: u64,
}

/// Whether this node may serve its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// The lease holds.
    Yes,
    /// Renewals failed past the node's deadline: it serves nothing until a renewal succeeds
    /// (the lease may still be its own, as long as Redis has not expired it).
    Suspended,
    /// The lease is gone or belongs to a newer incarnation: this incarnation never serves
    /// again; the node must join anew.
    Lost,
}

/// How a node holds its membership.
#[derive(Clone)]
pub struct Options {
    /// `redis://` URL of the coordination store (credentials allowed; never logged).
    pub redis_url: String,
    /// The cluster's name: the prefix of its keys, so that clusters can share a server.
    pub cluster: String,
    /// This node's name.
    pub node: NodeName,
    /// Where this node's link listens, as others should dial it.
    pub addr: String,
    /// The lease's time to live in Redis.
    pub lease: Duration,
    /// How often the lease is renewed (and the table read).
    pub renew: Duration,
    /// The bound on clock drift between this node and Redis over one lease.
    pub clock_bound: Duration,
}

impl Options {
    /// Defaults for `node` on the local Redis: lease 5 s, renewal every 1 s, clock bound
    /// 500 ms.
    pub fn new(redis_url: impl Into<String>, cluster: impl Into<String>, node: NodeName) -> Self {
        Self {
            redis_url: redis_url.into(),
            cluster: cluster.into(),
            node,
            addr: String::new(),
            lease: Duration::from_secs(5),
            renew: Duration::from_secs(1),
            clock_bound: Duration::from_millis(500),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, reason: &'static str| Err(Error::Config { key, reason });
        if self.cluster.is_empty()
            || !self
                .cluster
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return bad("cluster.name", "must be ASCII letters, digits, '-' or '_'");
        }
        if self.renew.is_zero() {
            return bad("cluster.renew_ms", "must be above 0");
        }
        // A renewal must be able to succeed (and fail, by its timeout) well inside the
        // window in which the node still serves.
        if self.renew * 2 + self.clock_bound >= self.lease {
            return bad(
                "cluster.lease_ms",
                "must exceed twice cluster.renew_ms plus cluster.clock_bound_ms",
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for Options {
    /// The URL may carry a password: only where it points is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("redis", &crate::journal::location(&self.redis_url))
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .field("addr", &self.addr)
            .field("lease", &self.lease)
            .field("renew", &self.renew)
            .field("clock_bound", &self.clock_bound)
            .finish()
    }
}

/// Keys of one cluster in Redis.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn of(cluster: &str) -> Self {
        // A hash tag: on a Redis Cluster every key of one cluster is in one slot, so the
        // scripts may touch several of them.
        Self {
            prefix: format!("soma:{{{cluster}}}"),
        }
    }
    fn members(&self) -> String {
        format!("{}:members", self.prefix)
    }
    fn incarnation(&self, node: &NodeName) -> String {
        format!("{}:incarnation:{node}", self.prefix)
    }
    pub(crate) fn lease(&self, node: &NodeName) -> String {
        format!("{}:lease:{node}", self.prefix)
    }
    fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }
    pub(crate) fn shard(&self, shard: soma_supervision::KeyRange) -> String {
        format!("{}:shard:{}", self.prefix, shard.0)
    }
    /// What `lease` puts before a node's name (the shard scripts look a holder's lease up).
    pub(crate) fn lease_prefix(&self) -> String {
        format!("{}:lease:", self.prefix)
    }
}

/// A node's membership: its lease, renewed in the background until [`Membership::leave`]
/// or [`Membership::shutdown`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    options: Options,
    keys: Keys,
    incarnation: u64,
    conn: ConnectionManager,
    serving: watch::Receiver<Serving>,
    members: watch::Receiver<Arc<[Member]>>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("cluster", &self.options.cluster)
            .field("node", &self.options.node)
            .field("incarnation", &self.incarnation)
            .field("serving", &*self.serving.borrow())
            .finish_non_exhaustive()
    }
}

/// A connection to the coordination store at `url` (one reconnection attempt per failed
/// call; the rest of `config` is the caller's).
pub(crate) async fn connect(
    url: &str,
    config: ConnectionManagerConfig,
) -> Result<ConnectionManager> {
    let client = redis::Client::open(url).map_err(|_| Error::Config {
        key: "cluster.redis_url",
        reason: "is not a valid redis:// URL",
    })?;
    ConnectionManager::new_with_config(client, config.set_number_of_retries(1))
        .await
        .map_err(Error::redis)
}

/// The wall clock, Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Membership {
    /// Joins the cluster as a new incarnation of `options.node`, state
    /// [`NodeState::Joining`]. If an earlier incarnation's lease is still alive (a restart
    /// right after a crash), waits for it to expire first, so that two incarnations never
    /// hold a lease at once.
    #[tracing::instrument(skip_all, fields(cluster = %options.cluster, node = %options.node))]
    pub async fn join(options: Options) -> Result<Self> {
        options.validate()?;
        let mut conn = connect(
            &options.redis_url,
            ConnectionManagerConfig::new()
                .set_max_delay(millis(options.renew))
                .set_connection_timeout(options.renew)
                .set_response_timeout(options.renew),
        )
        .await?;
        let keys = Keys::of(&options.cluster);
        let incarnation: u64 = redis::cmd("INCR")
            .arg(keys.incarnation(&options.node))
            .query_async(&mut conn)
            .await
            .map_err(Error::redis)?;
        let member = Member {
            name: options.node.clone(),
            incarnation,
            state: NodeState::Joining,
            addr: options.addr.clone(),
            since_ms: now_ms(),
        };
        let sent = loop {
            let sent = Instant::now();
            let wait = scripts::join(&mut conn, &keys, &member, options.lease).await?;
            match wait {
                None => break sent,
                Some(left) => {
                    tracing::info!(
                        wait_ms = millis(left),
                        "earlier incarnation still holds the lease"
                    );
                    tokio::time::sleep(left + Duration::from_millis(10)).await;
                }
            }
        };
        tracing::info!(incarnation, "joined");
        let (serving_tx, serving) = watch::channel(Serving::Yes);
        let (members_tx, members) = watch::channel(Arc::<[Member]>::from([]));
        let (stop, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            options,
            keys,
            incarnation,
            conn,
            serving,
            members,
            stop,
            task: std::sync::Mutex::new(None),
        });
        let renewer = Renewer {
            inner: Arc::downgrade(&inner),
            conn: inner.conn.clone(),
            options: inner.options.clone(),
            keys: inner.keys.clone(),
            incarnation,
            serving: serving_tx,
            members: members_tx,
            deadline: sent + inner.options.lease - inner.options.clock_bound,
        };
        let task = tokio::spawn(renewer.run(sent, stop_rx));
        if let Ok(mut t) = inner.task.lock() {
            *t = Some(task);
        }
        Ok(Self { inner })
    }

    /// This incarnation's number.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// This node's name.
    pub fn node(&self) -> &NodeName {
        &self.inner.options.node
    }

    /// Whether this node may serve: watch it, and stop serving on anything but
    /// [`Serving::Yes`].
    pub fn serving(&self) -> watch::Receiver<Serving> {
        self.inner.serving.clone()
    }

    /// The table as last read (every renewal, and on every published change).
    pub fn members(&self) -> watch::Receiver<Arc<[Member]>> {
        self.inner.members.clone()
    }

    /// Reads the table now.
    pub async fn read_members(&self) -> Result<Vec<Member>> {
        let rows = self
            .retrying(
                |mut conn| async move { scripts::read_members(&mut conn, &self.inner.keys).await },
            )
            .await?;
        Ok(rows.into_iter().map(|(_, m)| m).collect())
    }

    /// Runs `op` up to three times while the connection is being re-established (a Redis
    /// restart drops it; the connection manager reconnects in the background). Only for
    /// operations that may run twice: each is a check-and-set of the same row.
    async fn retrying<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut last = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(self.inner.options.renew / 2).await;
            }
            match op(self.inner.conn.clone()).await {
                Err(Error::Redis(e)) => last = Some(Error::Redis(e)),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::Redis("no attempt made".into())))
    }

    /// Sets this node's state; [`Error::LeaseLost`] if this incarnation no longer holds its
    /// lease.
    #[tracing::instrument(skip(self), fields(node = %self.inner.options.node))]
    pub async fn set_state(&self, state: NodeState) -> Result<()> {
        let member = self.row(state);
        let keys = &self.inner.keys;
        let held = self
            .retrying(|mut conn| {
                let member = &member;
                async move { scripts::set_state(&mut conn, keys, member, false).await }
            })
            .await?;
        if held {
            tracing::info!(state = state.as_str(), "node state set");
            Ok(())
        } else {
            Err(Error::LeaseLost {
                node: member.name,
                incarnation: member.incarnation,
            })
        }
    }

    /// Leaves: state [`NodeState::Down`], the lease dropped, the renewals ended.
    pub async fn leave(&self) -> Result<()> {
        let member = self.row(NodeState::Down);
        let keys = &self.inner.keys;
        let held = self
            .retrying(|mut conn| {
                let member = &member;
                async move { scripts::set_state(&mut conn, keys, member, true).await }
            })
            .await;
        let held = match held {
            Ok(held) => held,
            Err(e) => {
                self.shutdown().await;
                return Err(e);
            }
        };
        self.shutdown().await;
        if held {
            tracing::info!(node = %member.name, "left the cluster");
            Ok(())
        } else {
            Err(Error::LeaseLost {
                node: member.name,
                incarnation: member.incarnation,
            })
        }
    }

    /// Ends the renewals without leaving (the lease then expires as after a crash).
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// A handle on the shared connection (cheap: it multiplexes).
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn row(&self, state: NodeState) -> Member {
        Member {
            name: self.inner.options.node.clone(),
            incarnation: self.inner.incarnation,
            state,
            addr: self.inner.options.addr.clone(),
            since_ms: now_ms(),
        }
    }
}

/// The background task: renews the lease, owns the serving state, reads the table, marks
/// down the members whose lease expired.
struct Renewer {
    inner: std::sync::Weak<Inner>,
    conn: ConnectionManager,
    options: Options,
    keys: Keys,
    incarnation: u64,
    serving: watch::Sender<Serving>,
    members: watch::Sender<Arc<[Member]>>,
    deadline: Instant,
}

impl Renewer {
    async fn run(mut self, mut sent: Instant, mut stop: watch::Receiver<bool>) {
        let mut events = self
            .guarded(scripts::subscribe(&self.options.redis_url, &self.keys))
            .await;
        self.guarded(self.refresh()).await;
        loop {
            let next = sent + self.options.renew;
            let serving = *self.serving.borrow() == Serving::Yes;
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(next) => {}
                _ = tokio::time::sleep_until(self.deadline), if serving => {
                    self.suspend();
                    continue;
                }
                changed = scripts::next_event(&mut events) => {
                    if changed {
                        self.guarded(self.refresh()).await;
                    } else {
                        // The subscription dropped (Redis restarted): subscribe again at
                        // the next renewal.
                        events = None;
                    }
                    continue;
                }
            }
            if self.inner.strong_count() == 0 {
                break;
            }
            sent = Instant::now();
            match self.renew().await {
                Ok(true) => {
                    metrics::counter!(RENEWALS, "outcome" => "renewed").increment(1);
                    self.deadline = sent + self.options.lease - self.options.clock_bound;
                    if *self.serving.borrow() != Serving::Yes {
                        tracing::info!(node = %self.options.node, "lease renewed: serving again");
                        self.serving.send_replace(Serving::Yes);
                    }
                }
                Ok(false) => {
                    metrics::counter!(RENEWALS, "outcome" => "lost").increment(1);
                    tracing::error!(node = %self.options.node, incarnation = self.incarnation, "lease lost: this incarnation serves nothing more");
                    self.serving.send_replace(Serving::Lost);
                    break;
                }
                Err(e) => {
                    metrics::counter!(RENEWALS, "outcome" => "failed").increment(1);
                    tracing::warn!(node = %self.options.node, error = %e, "lease renewal failed");
                    continue;
                }
            }
            if events.is_none() {
                events = self
                    .guarded(scripts::subscribe(&self.options.redis_url, &self.keys))
                    .await;
            }
            self.guarded(self.refresh()).await;
        }
    }

    /// One renewal, bounded by the renewal period, during which the serving deadline still
    /// applies (a renewal that hangs must not keep the node serving past it).
    async fn renew(&self) -> Result<bool> {
        let mut conn = self.conn.clone();
        let renewal = tokio::time::timeout(
            self.options.renew,
            scripts::renew(
                &mut conn,
                &self.keys,
                &self.options.node,
                self.incarnation,
                self.options.lease,
            ),
        );
        self.guarded(renewal)
            .await
            .unwrap_or_else(|_| Err(Error::Redis("lease renewal timed out".into())))
    }

    /// Runs `work` (a call to Redis, which may hang) while the serving deadline still
    /// applies: the node turns `Suspended` at its deadline whatever it is waiting for.
    async fn guarded<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            let serving = *self.serving.borrow() == Serving::Yes;
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep_until(self.deadline), if serving => self.suspend(),
            }
        }
    }

    fn suspend(&self) {
        tracing::warn!(node = %self.options.node, "lease renewals failed past the deadline: serving nothing");
        self.serving.send_replace(Serving::Suspended);
    }

    /// Reads the table, marks down the members whose lease expired, publishes the table.
    async fn refresh(&self) {
        let mut conn = self.conn.clone();
        let rows = match scripts::read_members(&mut conn, &self.keys).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "membership table unreadable");
                return;
            }
        };
        let mut members = Vec::with_capacity(rows.len());
        for (raw, mut m) in rows {
            if m.state != NodeState::Down && m.name != self.options.node {
                match scripts::mark_down(&mut conn, &self.keys, &raw, &m).await {
                    Ok(true) => {
                        metrics::counter!(MARKED_DOWN).increment(1);
                        tracing::warn!(down = %m.name, incarnation = m.incarnation, "lease expired: node marked down");
                        m.state = NodeState::Down;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "marking down failed"),
                }
            }
            members.push(m);
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        for state in [
            NodeState::Joining,
            NodeState::Up,
            NodeState::Draining,
            NodeState::Leaving,
            NodeState::Down,
        ] {
            let n = members.iter().filter(|m| m.state == state).count();
            metrics::gauge!(NODES, "state" => state.as_str()).set(n as f64);
        }
        self.members.send_if_modified(|cur| {
            if **cur == *members {
                false
            } else {
                *cur = members.into();
                true
            }
        });
    }
}
