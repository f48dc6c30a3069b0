//! A node of the cluster: a runtime on the Redis journal whose key ranges follow the
//! placement. One task owns which shards the node serves: whenever the member table or the
//! node's serving state changes it computes the placement over the up members, releases the
//! shards that moved away (their instances stop gracefully, then the shard table lets them
//! go) and acquires the shards that came to it (a compare-and-set that waits until their
//! previous holder released them or lost its lease; then their pending messages replay here).
//!
//! This is hand-off on join and leave and failover after a node's loss. Sends reach only the
//! keys the node owns (`Error::NotOwned` otherwise): routing a send to its owner over a node
//! link is not built yet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use soma_supervision::{Epoch, Journal, KeyRange, Runtime, RuntimeOptions};
use std::sync::RwLock;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::membership::Options;
use crate::{
    Error, Member, Membership, NodeName, NodeState, Placement, RedisJournal, RedisOptions, Result,
    Serving, Shards,
};

/// Metric: shards this node serves.
pub const SERVED: &str = "soma_cluster_shards_served";
/// Metric: shard hand-overs this node made, by `how` (`acquired`, `released`).
pub const MOVES: &str = "soma_cluster_shard_moves_total";
/// Metric: joins of this node as a new incarnation after its lease was lost.
pub const REJOINS: &str = "soma_cluster_rejoins_total";

/// How long a failed join waits before the next attempt.
const REJOIN_BACKOFF: Duration = Duration::from_millis(500);

/// How often a shard that could not be taken yet (its holder has not released it) is tried
/// again.
const RETRY: Duration = Duration::from_millis(100);

/// What a node's controller is doing, as its owner reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// The shards this node serves now.
    pub served: BTreeSet<u32>,
    /// The shards the placement gives it that it could not take yet.
    pub waiting: BTreeSet<u32>,
    /// Whether it serves at all (its lease holds).
    pub serving: bool,
    /// Whether the table it computed this from has it draining.
    pub draining: bool,
}

/// A running cluster node.
#[derive(Debug)]
pub struct Node {
    /// The current incarnation's membership (replaced when the node joins again).
    membership: Arc<RwLock<Membership>>,
    runtime: Runtime,
    view: watch::Receiver<NodeView>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Joins the cluster (`membership`), opens its Redis journal under the node's name and
    /// shard table, starts a runtime owning nothing, marks the node up and starts the
    /// controller. `journal.cluster` and `journal.node` are taken from `membership`.
    pub async fn start(
        membership: Options,
        mut journal: RedisOptions,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        journal.cluster.clone_from(&membership.cluster);
        journal.node = membership.node.as_str().to_string();
        let shards_count = journal.ranges;
        let m = Membership::join(membership.clone()).await?;
        let j = RedisJournal::open_in_cluster(journal, Shards::new(m.clone())).await?;
        let rt = Runtime::unowned(Arc::new(j.clone()), runtime);
        m.set_state(NodeState::Up).await?;
        let (view_tx, view) = watch::channel(NodeView::default());
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(RwLock::new(m));
        let task = tokio::spawn(control(
            Controller {
                options: membership,
                journal: j,
                shared: shared.clone(),
                rt: rt.clone(),
                shards: shards_count,
            },
            view_tx,
            stop_rx,
        ));
        Ok(Self {
            membership: shared,
            runtime: rt,
            view,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// The node's runtime: start registries on it; they serve the keys of the shards the
    /// node holds.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The node's membership: its current incarnation's.
    pub fn membership(&self) -> Membership {
        self.membership
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What the controller serves and waits for; changes are notified.
    pub fn view(&self) -> watch::Receiver<NodeView> {
        self.view.clone()
    }

    /// Hands every shard off and leaves: state draining (the others' placements stop giving
    /// it shards and they take them as it releases them), every shard released, then the
    /// runtime shut down and the lease dropped.
    pub async fn drain(&self) -> Result<()> {
        self.membership().set_state(NodeState::Draining).await?;
        let mut view = self.view.clone();
        view.wait_for(|v| v.draining && v.served.is_empty())
            .await
            .map_err(|_| Error::Redis("the node's controller ended".into()))?;
        self.stop().await;
        self.membership().leave().await
    }

    /// Ends the controller and the runtime without handing anything off (the shards go to
    /// the others once the lease expires, as after a crash).
    pub async fn shutdown(&self) {
        self.stop().await;
        self.membership().shutdown().await;
    }

    async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        if let Err(e) = self.runtime.shutdown().await {
            tracing::warn!(error = %e, "runtime shutdown failed");
        }
    }
}

/// The shards `me` should serve given the table: the placement over the up members.
fn desired(members: &[Member], me: &NodeName, shards: u32) -> BTreeSet<u32> {
    let up: Vec<NodeName> = members
        .iter()
        .filter(|m| m.state == NodeState::Up)
        .map(|m| m.name.clone())
        .collect();
    match Placement::compute(shards, &up) {
        Ok(p) => p.shards_of(me).into_iter().map(|r| r.0).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// What the controller works with.
struct Controller {
    /// To join again after the lease was lost.
    options: Options,
    journal: RedisJournal,
    shared: Arc<RwLock<Membership>>,
    rt: Runtime,
    shards: u32,
}

impl Controller {
    /// Joins as a new incarnation (the earlier one lost its lease: Redis restarted, or the
    /// node was partitioned from it past its lease) and marks it up; the journal takes
    /// ranges through the new incarnation's shard table from then on.
    async fn rejoin(&self) -> Result<Membership> {
        let m = Membership::join(self.options.clone()).await?;
        if let Err(e) = m.set_state(NodeState::Up).await {
            // Its renewals must end with it, or the next join waits for this lease forever.
            m.shutdown().await;
            return Err(e);
        }
        self.journal.use_shards(Shards::new(m.clone()));
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = m.clone();
        metrics::counter!(REJOINS).increment(1);
        tracing::info!(
            incarnation = m.incarnation(),
            "joined again after losing the lease"
        );
        Ok(m)
    }
}

/// The controller: the one owner of which shards this node serves.
async fn control(c: Controller, view: watch::Sender<NodeView>, mut stop: watch::Receiver<bool>) {
    let (rt, shards) = (c.rt.clone(), c.shards);
    let mut m = c.shared.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut members = m.members();
    let mut serving = m.serving();
    let me = m.node().clone();
    let mut served: BTreeSet<u32> = BTreeSet::new();
    let (mut members_open, mut serving_open) = (true, true);
    // Shards stopped here whose release in the shard table has not succeeded yet.
    let mut unreleased: BTreeMap<u32, Epoch> = BTreeMap::new();
    loop {
        let state = *serving.borrow_and_update();
        let ok = state == Serving::Yes;
        let table = members.borrow_and_update().clone();
        let draining = table
            .iter()
            .any(|r| r.name == me && r.state == NodeState::Draining);
        let want = if ok {
            desired(&table, &me, shards)
        } else {
            BTreeSet::new()
        };
        for r in served.difference(&want).copied().collect::<Vec<_>>() {
            // Stopped here first (the runtime writes nothing more to it), whatever Redis
            // answers. Not serving (the lease is in doubt, Redis may be away): only that; the
            // fence in Redis refuses this node's writes once its lease is gone, and the shard
            // goes to another node then. Serving: then handed off in the shard table.
            let epoch = rt.abandon(KeyRange(r)).await;
            served.remove(&r);
            if let (true, Some(epoch)) = (ok, epoch) {
                unreleased.insert(r, epoch);
            }
        }
        for (r, epoch) in std::mem::take(&mut unreleased) {
            match c.journal.release(KeyRange(r), epoch).await {
                // Fenced: it is no longer this incarnation's at that epoch anyway.
                Ok(()) | Err(soma_supervision::Error::Fenced { .. }) => {
                    metrics::counter!(MOVES, "how" => "released").increment(1);
                    tracing::info!(shard = r, "shard handed off");
                }
                Err(e) => {
                    tracing::warn!(shard = r, error = %e, "shard release failed; trying again");
                    unreleased.insert(r, epoch);
                }
            }
        }
        let mut waiting = BTreeSet::new();
        for r in want.difference(&served).copied().collect::<Vec<_>>() {
            if *stop.borrow() {
                break;
            }
            match rt.acquire(KeyRange(r)).await {
                Ok(epoch) => {
                    served.insert(r);
                    metrics::counter!(MOVES, "how" => "acquired").increment(1);
                    tracing::info!(shard = r, epoch, "shard taken");
                }
                Err(e) => {
                    tracing::debug!(shard = r, error = %e, "shard not taken yet");
                    // Taken in the shard table but not activated here: give it back.
                    if let Some(epoch) = rt.abandon(KeyRange(r)).await {
                        unreleased.insert(r, epoch);
                    }
                    waiting.insert(r);
                }
            }
        }
        metrics::gauge!(SERVED).set(served.len() as f64);
        view.send_replace(NodeView {
            served: served.clone(),
            waiting: waiting.clone(),
            serving: ok,
            draining,
        });
        if state == Serving::Lost && !draining {
            // Everything was stopped above; this incarnation never serves again (and its
            // releases would be refused: its shards go to whoever takes them).
            unreleased.clear();
            m.shutdown().await;
            let joined = tokio::select! {
                _ = stop.changed() => break,
                r = c.rejoin() => r,
            };
            match joined {
                Ok(new) => {
                    m = new;
                    members = m.members();
                    serving = m.serving();
                    (members_open, serving_open) = (true, true);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "joining again failed");
                    tokio::select! {
                        _ = stop.changed() => break,
                        () = tokio::time::sleep(REJOIN_BACKOFF) => {}
                    }
                }
            }
            continue;
        }
        let retry = async {
            if waiting.is_empty() && unreleased.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RETRY).await;
        };
        // The membership's channels close when its renewals end (a lost lease ends them):
        // their last value stands, and a lost lease is handled at the top of the loop.
        tokio::select! {
            _ = stop.changed() => break,
            r = members.changed(), if members_open => members_open = r.is_ok(),
            r = serving.changed(), if serving_open => serving_open = r.is_ok(),
            () = retry => {}
        }
        if *stop.borrow() {
            break;
        }
    }
    // A drain ends here with nothing served; a shutdown leaves its shards to expire with
    // its lease, as a crash would.
    view.send_replace(NodeView {
        served,
        waiting: BTreeSet::new(),
        serving: false,
        draining: false,
    });
}
