//! Replica pools: N supervised replica actors per model, each registering itself in a slot;
//! requests go to the live replica with the fewest in flight.

mod batch;
mod embedder;
mod generator;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{ActorRef, ActorStatus};
use soma_supervision::{
    Backoff, ChildSpec, Intensity, Policy, Strategy, Supervisor, SupervisorMsg,
};

use crate::error::{Error, Result};

pub use batch::BatchStats;
pub use embedder::{EmbedderConfig, EmbedderPool};
pub use generator::{GenerationStream, GeneratorConfig, GeneratorPool};

/// How long a request waits for a restarting replica before failing with
/// [`Error::Unavailable`].
const REPLICA_WAIT: Duration = Duration::from_secs(10);

/// A snapshot of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Replicas configured.
    pub replicas: usize,
    /// Replicas running now.
    pub live: usize,
    /// Requests (generation) or batches (embeddings) in flight per replica, queued included.
    pub in_flight: Vec<usize>,
    /// Replica starts so far, restarts included.
    pub starts: usize,
}

/// Where a replica actor registers itself.
#[derive(Debug)]
pub(crate) struct Slot<M: Send + 'static> {
    pub(crate) index: usize,
    actor: Mutex<Option<ActorRef<M>>>,
    load: AtomicUsize,
}

impl<M: Send + 'static> Slot<M> {
    fn register(&self, actor: ActorRef<M>) {
        if let Ok(mut a) = self.actor.lock() {
            *a = Some(actor);
        }
    }

    pub(crate) fn unregister(&self, actor: &ActorRef<M>) {
        if let Ok(mut a) = self.actor.lock()
            && a.as_ref().is_some_and(|x| x.get_id() == actor.get_id())
        {
            *a = None;
        }
    }

    fn live(&self) -> Option<ActorRef<M>> {
        let a = self.actor.lock().ok()?.clone()?;
        (a.get_status() == ActorStatus::Running).then_some(a)
    }
}

/// What a replica actor gets from its pool: its slot, its compute threads, the start count.
pub(crate) struct ReplicaCtx<M: Send + 'static> {
    pub(crate) slot: Arc<Slot<M>>,
    pub(crate) compute: Arc<rayon::ThreadPool>,
    starts: Arc<AtomicUsize>,
    pool: &'static str,
}

impl<M: Send + 'static> ReplicaCtx<M> {
    pub(crate) fn index(&self) -> usize {
        self.slot.index
    }

    /// Registers a (re)started replica so requests reach it; counts and logs the start.
    pub(crate) fn started(&self, myself: ActorRef<M>) {
        self.slot.register(myself);
        self.starts.fetch_add(1, Ordering::AcqRel);
        metrics::counter!(crate::metrics::REPLICA_STARTS, "pool" => self.pool).increment(1);
        tracing::info!(
            pool = self.pool,
            replica = self.slot.index,
            "replica started"
        );
    }
}

/// Counts one request against a slot until dropped.
#[derive(Debug)]
pub(crate) struct LoadGuard<M: Send + 'static>(Arc<Slot<M>>);

impl<M: Send + 'static> Drop for LoadGuard<M> {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The replicas of one pool and their supervisor.
#[derive(Debug)]
pub(crate) struct Replicas<M: Send + 'static> {
    pub(crate) name: &'static str,
    pub(crate) slots: Vec<Arc<Slot<M>>>,
    supervisor: Option<ActorRef<SupervisorMsg>>,
    starts: Arc<AtomicUsize>,
}

/// Counts one accepted request against a pool's limit until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more if fewer than `limit` are counted.
    pub(crate) fn try_new(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<M: ractor::Message> Replicas<M> {
    pub(crate) fn new(name: &'static str, n: usize) -> Self {
        Self {
            name,
            slots: (0..n)
                .map(|index| {
                    Arc::new(Slot {
                        index,
                        actor: Mutex::new(None),
                        load: AtomicUsize::new(0),
                    })
                })
                .collect(),
            supervisor: None,
            starts: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Starts the supervisor with one child per slot, made by `make` from the replica's
    /// context (the replicas share the pool's compute threads, kept across restarts).
    pub(crate) async fn start<A, F>(&mut self, make: F) -> Result<()>
    where
        A: ractor::Actor<Msg = M>,
        F: Fn(ReplicaCtx<M>) -> (A, A::Arguments) + Send + Sync + Clone + 'static,
    {
        let mut children = Vec::with_capacity(self.slots.len());
        // One set of compute threads for the whole pool: replicas x threads never exceeds
        // the threads configured (the cores).
        let shared = Arc::new(crate::device::replica_pool(self.name)?);
        for slot in &self.slots {
            let compute = shared.clone();
            let (slot, make, starts, pool) =
                (slot.clone(), make.clone(), self.starts.clone(), self.name);
            children.push(ChildSpec::new(
                format!("{}-{}", self.name, slot.index),
                soma_supervision::Restart::Transient,
                move || {
                    make(ReplicaCtx {
                        slot: slot.clone(),
                        compute: compute.clone(),
                        starts: starts.clone(),
                        pool,
                    })
                },
            ));
        }
        let policy = Policy {
            strategy: Strategy::OneForOne,
            intensity: Intensity {
                max_restarts: 20,
                window_ms: 60_000,
            },
            backoff: Backoff {
                initial_ms: 10,
                max_ms: 2_000,
                ..Backoff::default()
            },
        };
        let sup = Supervisor::start(format!("inference-{}", self.name), policy, children, None)
            .await
            .map_err(|e| Error::Config(format!("starting the {} pool: {e}", self.name)))?;
        self.supervisor = Some(sup);
        Ok(())
    }

    /// The live replica with the fewest requests, counted against until the guard drops.
    /// Waits for a restarting replica up to [`REPLICA_WAIT`].
    pub(crate) async fn pick(&self) -> Result<(ActorRef<M>, LoadGuard<M>)> {
        let deadline = tokio::time::Instant::now() + REPLICA_WAIT;
        loop {
            let best = self
                .slots
                .iter()
                .filter_map(|s| s.live().map(|a| (s, a)))
                .min_by_key(|(s, _)| s.load.load(Ordering::Acquire));
            if let Some((slot, actor)) = best {
                slot.load.fetch_add(1, Ordering::AcqRel);
                return Ok((actor, LoadGuard(slot.clone())));
            }
            if self.supervisor.is_none() || tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(self.name));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Returns once some replica is live, waiting for a restarting one up to
    /// [`REPLICA_WAIT`]; [`Error::Unavailable`] after that.
    pub(crate) async fn wait_live(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + REPLICA_WAIT;
        while !self.slots.iter().any(|s| s.live().is_some()) {
            if self.supervisor.is_none() || tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(self.name));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub(crate) fn total_load(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.load.load(Ordering::Acquire))
            .sum()
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            replicas: self.slots.len(),
            live: self.slots.iter().filter(|s| s.live().is_some()).count(),
            in_flight: self
                .slots
                .iter()
                .map(|s| s.load.load(Ordering::Acquire))
                .collect(),
            starts: self.starts.load(Ordering::Acquire),
        }
    }

    /// Kills replica `i` at once (what a crash does): its in-flight requests fail and the
    /// supervisor starts it again. For chaos tests and operators.
    pub(crate) fn kill(&self, i: usize) -> Result<()> {
        let slot = self
            .slots
            .get(i)
            .ok_or_else(|| Error::Config(format!("the {} pool has no replica {i}", self.name)))?;
        let actor = slot.live().ok_or(Error::Unavailable(self.name))?;
        tracing::warn!(pool = self.name, replica = i, "killing replica");
        actor.kill();
        Ok(())
    }

    /// Waits until every replica is running again.
    pub(crate) async fn wait_all_live(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.slots.iter().any(|s| s.live().is_none()) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(self.name));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl<M: Send + 'static> Drop for Replicas<M> {
    fn drop(&mut self) {
        for slot in &self.slots {
            if let Some(a) = slot.actor.lock().ok().and_then(|mut a| a.take()) {
                a.stop(None);
            }
        }
        if let Some(sup) = self.supervisor.take() {
            sup.stop(None);
        }
    }
}
