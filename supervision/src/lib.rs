//! Durable supervised actors on ractor: persistent mailboxes (the journal), replay after any
//! crash with exactly-once state effects, dead letters, supervisors, passivation and timers.
//!
//! # When to use what
//! - [`Runtime`] opens the journal; one per process.
//! - [`Runtime::registry`] gives a [`Registry`] for one [`DurableActor`] type: send to any key,
//!   read committed state, list and re-drive dead letters.
//! - [`Supervisor`] supervises ordinary (non-durable) ractor actors with a [`Policy`].
//! - [`Journal`] is the storage contract; [`SledJournal`] is the embedded backend.
//!
//! The guarantees (ordering, delivery, durability, replay, stop versus kill) are stated in
//! `docs/semantics.md`.

mod actor;
mod cell;
mod codec;
mod error;
mod journal;
pub mod metrics;
mod policy;
mod registry;
mod runtime;
mod slot;
mod supervisor;
mod timers;
mod writer;

pub use actor::{Context, DurableActor, HandlerError};
pub use codec::MAX_MESSAGE_BYTES;
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-util"))]
pub use journal::contract;
pub use journal::{
    Append, Bytes, Commit, DeadLetter, Durability, Entry, Journal, NewTimer, Seq, SledJournal,
    SledOptions, Snapshot, Timer,
};
pub use policy::{Backoff, Intensity, Restart, Strategy};
pub use registry::{Registry, RegistryOptions, WhenFull};
pub use runtime::{Runtime, RuntimeOptions};
pub use supervisor::{ChildSpec, Policy, Supervisor, SupervisorMsg, SupervisorState};
pub use writer::WriterStats;
