//! The runtime: one journal, its group-commit writer and timer task, and the registries of
//! durable actors built on them. Open one per process (per journal).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::actor::DurableActor;
use crate::error::{Error, Result};
use crate::journal::{Epoch, Journal, KeyRange, Seq, SledJournal, SledOptions};
use crate::owner::Ownership;
use crate::registry::{KEY_SEPARATOR, Registry, RegistryOptions};
use crate::timers::TimerHandle;
use crate::writer::{WriterHandle, WriterStats};

/// Options of a runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeOptions {
    /// The embedded sled journal.
    pub journal: SledOptions,
    /// Most messages per group-commit batch.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

fn default_max_batch() -> usize {
    4096
}

impl RuntimeOptions {
    /// Options for a sled journal at `path`, with defaults.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            journal: SledOptions::new(path),
            max_batch: default_max_batch(),
        }
    }
}

/// Where journal appends made outside a send (timers, re-drives) are delivered.
pub(crate) trait Route: Send + Sync {
    fn appended(&self, key: &str, seq: Seq);
}

/// Registry name to route.
#[derive(Clone, Default)]
pub(crate) struct Routes {
    map: Arc<RwLock<HashMap<String, Arc<dyn Route>>>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes").finish_non_exhaustive()
    }
}

impl Routes {
    /// The route and actor key of a journal key.
    pub(crate) fn resolve(&self, jkey: &str) -> Option<(Arc<dyn Route>, String)> {
        let (name, key) = jkey.split_once(KEY_SEPARATOR)?;
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|r| (r.clone(), key.to_string()))
    }
}

/// A running runtime. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Runtime {
    journal: Arc<dyn Journal>,
    writer: WriterHandle,
    timers: TimerHandle,
    routes: Routes,
    owner: Arc<Ownership>,
}

impl Runtime {
    /// Opens the embedded sled journal and starts the runtime's tasks. Must be called within
    /// a tokio runtime.
    pub async fn open(options: RuntimeOptions) -> Result<Self> {
        let journal_options = options.journal.clone();
        // The recovery scan reads the whole inbox log: off the async workers.
        let journal = tokio::task::spawn_blocking(move || SledJournal::open(journal_options))
            .await
            .map_err(|e| Error::Spawn {
                name: "journal".into(),
                detail: e.to_string(),
            })??;
        Self::with_journal(Arc::new(journal), options.max_batch).await
    }

    /// Starts a runtime on any journal backend, owning every key range of it (one node).
    pub async fn with_journal(journal: Arc<dyn Journal>, max_batch: usize) -> Result<Self> {
        let rt = Self::unowned(journal, max_batch);
        for r in 0..rt.journal.ranges() {
            rt.owner.acquire(KeyRange(r)).await?;
        }
        Ok(rt)
    }

    /// Starts a runtime on any journal backend owning no range yet: it serves only the
    /// ranges it [`acquire`](Self::acquire)s (a node of a cluster).
    pub fn unowned(journal: Arc<dyn Journal>, max_batch: usize) -> Self {
        let routes = Routes::default();
        let owner = Arc::new(Ownership::new(journal.clone()));
        Self {
            writer: WriterHandle::start(journal.clone(), max_batch),
            timers: TimerHandle::start(journal.clone(), routes.clone(), owner.clone()),
            journal,
            routes,
            owner,
        }
    }

    /// Takes ownership of `range` (fencing its previous owner) and returns its new epoch.
    pub async fn acquire(&self, range: KeyRange) -> Result<Epoch> {
        let epoch = self.owner.acquire(range).await?;
        self.timers.poke();
        Ok(epoch)
    }

    /// Gives up `range`: the journal refuses this runtime's further writes to it.
    pub async fn release(&self, range: KeyRange) -> Result<()> {
        self.owner.release(range).await
    }

    /// The ranges this runtime owns, with their epochs.
    pub fn owned(&self) -> Vec<(KeyRange, Epoch)> {
        self.owner.held()
    }

    pub(crate) fn owner(&self) -> Arc<Ownership> {
        self.owner.clone()
    }

    /// Starts the registry of one kind of durable actor. Actors of that kind with
    /// unacknowledged messages in the journal are activated at once and replay them.
    pub async fn registry<A: DurableActor>(
        &self,
        actor: A,
        options: RegistryOptions,
    ) -> Result<Registry<A>> {
        Registry::start(self, actor, options).await
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.journal
    }

    pub(crate) fn writer(&self) -> WriterHandle {
        self.writer.clone()
    }

    pub(crate) fn timers(&self) -> TimerHandle {
        self.timers.clone()
    }

    pub(crate) fn add_route(&self, name: &str, route: Arc<dyn Route>) -> Result<()> {
        let mut map = self.routes.map.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(name) {
            return Err(Error::InvalidOption {
                key: "registry.name",
                reason: format!("a registry named {name:?} already runs on this runtime"),
            });
        }
        map.insert(name.to_string(), route);
        drop(map);
        self.timers.poke();
        Ok(())
    }

    /// Group-commit counters: how many batches and messages the writer appended.
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Flushes the journal: everything committed so far is durable.
    pub async fn flush(&self) -> Result<()> {
        self.journal.flush().await
    }
}
