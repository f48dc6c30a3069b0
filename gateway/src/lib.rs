//! The HTTP edge of SomaAgent: an axum server owned by a supervised gateway actor, serving
//! an OpenAI-compatible API (`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`) over
//! the inference pools, with API keys, per-key rate limits and `/health`, `/ready`,
//! `/metrics`.
//!
//! Errors on `/v1/*` take OpenAI's shape (`{"error": {"message", "type", "param",
//! "code"}}`); everywhere else `application/problem+json` with a stable `code`.

mod chat;
mod config;
mod embeddings;
mod error;
mod governed;
mod keys;
mod models;
mod server;
mod tools;

pub use config::GatewayConfig;
pub use error::{ApiError, Error, Result};
pub use governed::Governed;
pub use keys::{KeyRecord, KeyStore, Principal, Refusal, check_tenant};
pub use models::{Models, Served};
pub use server::{Gateway, Readiness, Services};
