//! Durable supervised actors on ractor: persistent mailboxes (the journal), replay after any
//! crash with exactly-once state effects, dead letters, supervisors, passivation and timers.
//!
//! # When to use what
//! - [`Runtime`] opens the journal; one per process.
//! - [`Runtime::registry`] gives a [`Registry`] for one [`DurableActor`] type: send to any key,
//!   read committed state, list and re-drive dead letters.
//! - [`Supervisor`] supervises ordinary (non-durable) ractor actors with a [`Policy`].
//! - [`Journal`] is the storage contract (ownership of [`KeyRange`]s by [`Epoch`], fenced
//!   writes, compare-and-set commits); [`SledJournal`] is the embedded backend; [`check`]
//!   and [`salvage`] are the operator's tools for a damaged one.
//! - [`Runtime::shutdown`] ends everything the runtime started and closes the journal.
//!
//! The guarantees (ordering, delivery, durability, replay, stop versus kill) are stated in
//! `docs/semantics.md`.
//!
//! # Example
//! ```
//! use soma_supervision::{Context, DurableActor, HandlerError, RegistryOptions, Runtime, RuntimeOptions};
//!
//! struct Total;
//!
//! impl DurableActor for Total {
//!     type Msg = u64;
//!     type State = u64;
//!     fn init(&self, _key: &str) -> u64 {
//!         0
//!     }
//!     async fn handle(&self, _: &mut Context<u64>, total: &mut u64, n: u64) -> Result<(), HandlerError> {
//!         *total += n;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> soma_supervision::Result<()> {
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let rt = Runtime::open(RuntimeOptions::new(dir.path().join("journal"))).await?;
//! let totals = rt.registry(Total, RegistryOptions::new("total")).await?;
//! totals.send("tenant/acme/total", &40).await?; // durable once this returns
//! let seq = totals.send("tenant/acme/total", &2).await?;
//! totals.wait_handled("tenant/acme/total", seq).await?;
//! assert_eq!(totals.state("tenant/acme/total").await?, 42);
//! rt.shutdown().await?; // every registry stops, the journal closes cleanly
//! # Ok(())
//! # }
//! ```

mod actor;
mod clock;
mod codec;
mod entry;
mod error;
mod ids;
mod instance;
mod journal;
mod keys;
mod life;
pub mod metrics;
mod options;
mod owner;
mod policy;
mod registry;
mod routes;
mod runtime;
mod supervisor;
mod timers;
mod writer;

pub use actor::{Context, DurableActor, HandlerError, MAX_TIMERS_PER_MESSAGE};
pub use codec::MAX_MESSAGE_BYTES;
pub use error::{Error, Fence, Result};
#[cfg(any(test, feature = "test-util"))]
pub use journal::contract;
pub use journal::{
    Append, Bytes, CheckReport, Commit, DeadLetter, Durability, Entry, Epoch, Journal, KeyRange,
    NewTimer, SalvageReport, Seq, SledJournal, SledOptions, Snapshot, Timer, check, range_of,
    salvage,
};
pub use options::{RegistryOptions, WhenFull};
pub use policy::{Backoff, Intensity, Restart, Strategy};
pub use registry::{Registry, WeakRegistry};
pub use runtime::{Runtime, RuntimeOptions};
pub use supervisor::{ChildSpec, Policy, Supervisor, SupervisorMsg, SupervisorState};
pub use writer::WriterStats;
