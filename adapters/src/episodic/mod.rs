//! Episodic memory: the ordered history of a (tenant, session), with time-range reads, TTL
//! expiry and erasure of a session or a whole tenant.
//!
//! Tenant isolation is the adapter's job: every operation takes a [`Scope`] (or a tenant) and
//! can only see that scope's entries.

#[cfg(any(test, feature = "test-util"))]
pub mod contract;
#[cfg(feature = "redis")]
mod redis;
mod sled;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[cfg(feature = "redis")]
pub use self::redis::RedisEpisodic;
pub use self::sled::SledEpisodic;

const MAX_ID_LEN: usize = 256;

/// One remembered event of a session: a message, a tool result, an observation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who or what produced it (`user`, `assistant`, `tool:github`, ...).
    pub role: String,
    /// The text.
    pub content: String,
    /// Anything else, as JSON.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// An entry as stored, with the id the store gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Unique within the store; increasing in append order.
    pub id: u64,
    /// The entry.
    pub entry: Entry,
}

/// A validated (tenant, session) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    tenant: String,
    session: String,
}

pub(crate) fn check_id(what: &'static str, value: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::Invalid {
            what,
            value: value.chars().take(64).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > MAX_ID_LEN {
        return bad("is longer than 256 bytes");
    }
    if value.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    Ok(())
}

impl Scope {
    /// A scope; both parts must be 1-256 bytes without control characters.
    pub fn new(tenant: impl Into<String>, session: impl Into<String>) -> Result<Self> {
        let (tenant, session) = (tenant.into(), session.into());
        check_id("tenant", &tenant)?;
        check_id("session", &session)?;
        Ok(Self { tenant, session })
    }

    /// The tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The session.
    pub fn session(&self) -> &str {
        &self.session
    }
}

/// Episodic memory. Entries of one scope are returned oldest first.
#[async_trait]
pub trait EpisodicMemory: Send + Sync + std::fmt::Debug + 'static {
    /// Appends an entry to the scope's history; returns its id.
    async fn append(&self, scope: &Scope, entry: Entry) -> Result<u64>;

    /// The last `n` entries of the scope, oldest first.
    async fn last(&self, scope: &Scope, n: usize) -> Result<Vec<Stored>>;

    /// The scope's entries with `from_ms <= at_ms < to_ms`, oldest first.
    async fn range(&self, scope: &Scope, from_ms: u64, to_ms: u64) -> Result<Vec<Stored>>;

    /// Removes every entry (of every tenant) with `at_ms < cutoff_ms`; returns how many.
    async fn expire_before(&self, cutoff_ms: u64) -> Result<u64>;

    /// Removes the scope's whole history, durably; returns how many entries.
    async fn erase_session(&self, scope: &Scope) -> Result<u64>;

    /// Removes every session of `tenant`, durably; returns how many entries.
    async fn erase_tenant(&self, tenant: &str) -> Result<u64>;
}
