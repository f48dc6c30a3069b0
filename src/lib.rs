//! SomaAgent: a runtime for governed, long-running AI-agent work.
//!
//! This facade re-exports the public API for programs that embed the runtime as a library:
//! the durable-actor layer ([`supervision`], its main types also at the root), the model
//! pool ([`inference`]), memory and event adapters ([`adapters`]), the domain
//! ([`actors`]: tenants, constitutions, tools, tool calls, sessions and agents) and the HTTP
//! edge ([`gateway`]).

pub use soma_actors as actors;
pub use soma_adapters as adapters;
pub use soma_gateway as gateway;
pub use soma_inference as inference;
pub use soma_supervision as supervision;
pub use soma_supervision::{
    Backoff, ChildSpec, Context, DurableActor, Error, HandlerError, Intensity, Policy, Registry,
    RegistryOptions, Restart, Result, Runtime, RuntimeOptions, Strategy, Supervisor, WhenFull,
};
