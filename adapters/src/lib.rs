//! The outside world behind traits: vector and episodic memory, event streams and tool
//! adapters, each with an embedded default and a server backend.
//!
//! Built so far: episodic memory ([`EpisodicMemory`]) with its embedded sled backend
//! ([`SledEpisodic`]), a Redis backend (`RedisEpisodic`, feature `redis`) and its contract
//! suite. Not implemented yet: vector memory, event streams, tool adapters.

mod episodic;
mod error;
mod events;

#[cfg(feature = "redis")]
pub use episodic::RedisEpisodic;
#[cfg(any(test, feature = "test-util"))]
pub use episodic::contract as episodic_contract;
pub use episodic::{Entry, EpisodicMemory, Scope, SledEpisodic, Stored};
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-util"))]
pub use events::contract as events_contract;
pub use events::{
    AuditEvent, ConversationEvent, Dedup, Envelope, EventStream, GroupConsumer, Outbox,
    OutboxOptions, Outcome, PolicyDecision, Receipt, Record, SledLog, SlmRequest, Topic,
    TopicEvent, TrainingAudit,
};
#[cfg(feature = "kafka")]
pub use events::{KafkaConfig, KafkaStream};
