//! SomaAgent: a runtime for governed, long-running AI-agent work.
//!
//! This facade re-exports the public API for programs that embed the runtime as a library.
//! Today that is the durable-actor layer ([`supervision`]); the cluster, domain actors,
//! inference pool, adapters and gateway are re-exported here as their crates land.

pub mod demo;

pub use soma_supervision as supervision;
pub use soma_supervision::{
    Backoff, ChildSpec, Context, DurableActor, Error, HandlerError, Intensity, Policy, Registry,
    RegistryOptions, Restart, Result, Runtime, RuntimeOptions, Strategy, Supervisor, WhenFull,
};
