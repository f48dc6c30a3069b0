//! The HTTP and WebSocket edge: a gateway actor with auth, per-tenant rate limits, an OpenAPI
//! document and `application/problem+json` errors.
//!
//! Not built yet: this crate holds no code until its issue comes.
