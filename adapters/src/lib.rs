//! The outside world behind traits: vector and episodic memory, event streams and tool
//! adapters, each with an embedded default and a server backend.
//!
//! - Vector memory ([`VectorMemory`]): [`EdgeVectors`] (qdrant-edge, in-process, default),
//!   `QdrantVectors` (feature `qdrant`).
//! - Episodic memory ([`EpisodicMemory`]): [`SledEpisodic`] (default), `RedisEpisodic`
//!   (feature `redis`).
//! - Event streams ([`EventStream`]): [`SledLog`] (default), `KafkaStream` (feature `kafka`),
//!   and [`Outbox`] in front of a server backend.
//!
//! Each trait has a contract suite (feature `test-util`) that every backend passes.
//! Tool adapters are not implemented yet.

mod episodic;
mod error;
mod events;
mod serde_ms;
mod store;
mod vector;

#[cfg(feature = "redis")]
pub use episodic::RedisEpisodic;
#[cfg(any(test, feature = "test-util"))]
pub use episodic::contract as episodic_contract;
pub use episodic::{Entry, EpisodicMemory, Scope, SledEpisodic, Stored};
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-util"))]
pub use events::contract as events_contract;
pub use events::{
    AuditEvent, ConversationEvent, Dedup, Envelope, EventStream, GroupConsumer, MAX_PAYLOAD_BYTES,
    Outbox, OutboxOptions, Outcome, PolicyDecision, Receipt, Record, SledLog, SlmRequest, Topic,
    TopicEvent, TrainingAudit,
};
#[cfg(feature = "kafka")]
pub use events::{KafkaConfig, KafkaStream};
#[cfg(any(test, feature = "test-util"))]
pub use vector::contract as vector_contract;
pub use vector::{Condition, EdgeVectors, Filter, Hit, MAX_K, MatchValue, Point, VectorMemory};
#[cfg(feature = "qdrant")]
pub use vector::{QdrantConfig, QdrantVectors};
