//! The runtime: one journal, its group-commit writer and timer task, and the registries of
//! durable actors built on them. Open one per process (per journal).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::actor::DurableActor;
use crate::error::{Error, Result};
use crate::journal::{Journal, Seq, SledJournal, SledOptions};
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
}

impl Runtime {
    /// Opens the embedded sled journal and starts the runtime's tasks. Must be called within
    /// a tokio runtime.
    pub async fn open(options: RuntimeOptions) -> Result<Self> {
        let journal = SledJournal::open(options.journal)?;
        Ok(Self::with_journal(Arc::new(journal), options.max_batch))
    }

    /// Starts a runtime on any journal backend.
    pub fn with_journal(journal: Arc<dyn Journal>, max_batch: usize) -> Self {
        let routes = Routes::default();
        Self {
            writer: WriterHandle::start(journal.clone(), max_batch),
            timers: TimerHandle::start(journal.clone(), routes.clone()),
            journal,
            routes,
        }
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
