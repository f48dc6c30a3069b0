//! The domain of SomaAgent as durable actors: tenants, sessions, agents, KAMACHIQ projects,
//! tool calls, and each tenant's constitution (Rego policies) gating every action.
//!
//! Not built yet: this crate holds no code until its issue comes.
