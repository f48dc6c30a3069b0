//! The runtime: one journal, its group-commit writer and timer task, the key ranges it owns,
//! and the registries of durable actors built on them. Open one per process (per journal);
//! end it with [`Runtime::shutdown`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::actor::DurableActor;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::journal::{Epoch, Journal, KeyRange, SledJournal, SledOptions};
use crate::options::RegistryOptions;
use crate::owner::Ownership;
use crate::registry::{Registry, Wiring};
use crate::routes::Routes;
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
    /// About the most payload bytes per group-commit batch.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
}

fn default_max_batch() -> usize {
    4096
}

fn default_max_batch_bytes() -> usize {
    16 * 1024 * 1024
}

impl RuntimeOptions {
    /// Options for a sled journal at `path`, with defaults.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            journal: SledOptions::new(path),
            max_batch: default_max_batch(),
            max_batch_bytes: default_max_batch_bytes(),
        }
    }

    /// Checks every value, naming the option that is wrong.
    pub fn validate(&self) -> Result<()> {
        self.journal.validate()?;
        if self.max_batch == 0 {
            return Err(Error::InvalidOption {
                key: "runtime.max_batch",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_batch_bytes == 0 {
            return Err(Error::InvalidOption {
                key: "runtime.max_batch_bytes",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// A running runtime. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Runtime {
    wiring: Wiring,
    shut: Arc<AtomicBool>,
}

impl Runtime {
    /// Opens the embedded sled journal (its recovery scan runs off the async workers) and
    /// starts the runtime's tasks, owning every key range. Must be called within a tokio
    /// runtime.
    pub async fn open(options: RuntimeOptions) -> Result<Self> {
        options.validate()?;
        let journal_options = options.journal.clone();
        let journal = tokio::task::spawn_blocking(move || SledJournal::open(journal_options))
            .await
            .map_err(|e| Error::Spawn {
                name: "journal".into(),
                detail: e.to_string(),
            })??;
        let rt = Self::unowned(Arc::new(journal), &options);
        rt.acquire_all().await?;
        Ok(rt)
    }

    /// Starts a runtime on any journal backend, owning every key range of it (one node).
    pub async fn with_journal(journal: Arc<dyn Journal>, options: &RuntimeOptions) -> Result<Self> {
        let rt = Self::unowned(journal, options);
        rt.acquire_all().await?;
        Ok(rt)
    }

    async fn acquire_all(&self) -> Result<()> {
        let all: Vec<KeyRange> = (0..self.wiring.journal.ranges()).map(KeyRange).collect();
        self.wiring.owner.acquire(&all).await.map(|_| ())
    }

    /// Starts a runtime on any journal backend owning no range yet: it serves only the
    /// ranges it [`acquire`](Self::acquire)s (a node of a cluster).
    pub fn unowned(journal: Arc<dyn Journal>, options: &RuntimeOptions) -> Self {
        let routes = Routes::default();
        let owner = Arc::new(Ownership::new(journal.clone()));
        let clock = Clock::new();
        Self {
            wiring: Wiring {
                writer: WriterHandle::start(
                    journal.clone(),
                    options.max_batch,
                    options.max_batch_bytes,
                ),
                timers: TimerHandle::start(journal.clone(), routes.clone(), owner.clone(), clock),
                journal,
                owner,
                routes,
                clock,
                crash_recovered: Default::default(),
            },
            shut: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Takes ownership of `range` (fencing its previous owner) and returns its new epoch;
    /// every running registry activates the range's keys with pending messages, and its
    /// timers fire here from now on.
    pub async fn acquire(&self, range: KeyRange) -> Result<Epoch> {
        let epoch = self
            .wiring
            .owner
            .acquire(&[range])
            .await?
            .first()
            .copied()
            .ok_or(Error::Stopped { what: "journal" })?;
        self.wiring.timers.poke();
        for registry in self.wiring.routes.all() {
            registry.acquired(range).await?;
        }
        Ok(epoch)
    }

    /// Gives up `range`: the instances of its keys stop gracefully (they finish the message
    /// in hand and commit), then the journal flushes and refuses this runtime's further
    /// writes to it. Sends to its keys fail with `Error::NotOwned`.
    pub async fn release(&self, range: KeyRange) -> Result<()> {
        for registry in self.wiring.routes.all() {
            registry.releasing(range).await;
        }
        self.wiring.owner.release(range).await
    }

    /// Stops serving `range` here without a word to the journal (a node that cannot reach
    /// its journal's server, or whose lease is in doubt): its instances stop as with
    /// [`release`](Self::release) and this runtime writes nothing more to it, but the journal
    /// still has this runtime's epoch as the range's until someone else acquires it. Returns
    /// that epoch, for a later `Journal::release` by the caller.
    pub async fn abandon(&self, range: KeyRange) -> Option<Epoch> {
        for registry in self.wiring.routes.all() {
            registry.releasing(range).await;
        }
        self.wiring.owner.forget(range)
    }

    /// The ranges this runtime owns, with their epochs.
    pub fn owned(&self) -> Vec<(KeyRange, Epoch)> {
        self.wiring.owner.held()
    }

    /// Starts the registry of one kind of durable actor. Actors of that kind in the owned
    /// ranges with unacknowledged messages in the journal are activated at once and replay
    /// them.
    pub async fn registry<A: DurableActor>(
        &self,
        actor: A,
        options: RegistryOptions,
    ) -> Result<Registry<A>> {
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Stopped { what: "runtime" });
        }
        Registry::start(self.wiring.clone(), actor, options).await
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.wiring.journal
    }

    /// Group-commit counters: how many batches and messages the writer appended.
    pub fn writer_stats(&self) -> WriterStats {
        self.wiring.writer.stats()
    }

    /// Flushes the journal: everything committed so far is durable.
    pub async fn flush(&self) -> Result<()> {
        self.wiring.journal.flush().await
    }

    /// Closes the journal's active inbox segment, so that it leaves the disk as soon as every
    /// message in it is handled (see [`Journal::roll`](crate::Journal::roll)).
    pub async fn roll_journal(&self) -> Result<()> {
        self.wiring.journal.roll().await
    }

    /// Ends the runtime: every registry stops (each instance finishes its current message),
    /// the timer task and the writer end, and the journal is closed cleanly (flushed; the
    /// next open knows nothing was killed). Every task the runtime started has ended when
    /// this returns; the journal directory can be opened again.
    pub async fn shutdown(&self) -> Result<()> {
        if self.shut.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for registry in self.wiring.routes.all() {
            registry.stop().await;
        }
        self.wiring.timers.shutdown().await;
        self.wiring.writer.shutdown().await;
        self.wiring.journal.close().await?;
        tracing::info!("runtime shut down");
        Ok(())
    }
}
