//! The Redis journal's options.

use serde::{Deserialize, Serialize};
use soma_supervision::{Error, MAX_MESSAGE_BYTES, Result};

/// How to reach the journal's Redis and what to call things there.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisOptions {
    /// `redis://` URL (credentials allowed; never logged).
    pub url: String,
    /// The cluster's name: the prefix of its keys (`soma:{<cluster>}`), shared with the
    /// membership and shard tables.
    pub cluster: String,
    /// This node's name: the journal records under it whether it was closed cleanly.
    pub node: String,
    /// Key ranges (the cluster's shards); fixed for the life of the cluster.
    #[serde(default = "default_ranges")]
    pub ranges: u32,
    /// The largest message accepted, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Refuse to open unless the server has `appendonly yes` and `appendfsync always`
    /// (without them an acknowledged message can be lost by a crash of the server).
    #[serde(default = "default_true")]
    pub require_fsync: bool,
    /// How long one command may take before it fails.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_ranges() -> u32 {
    1024
}
fn default_max_message_bytes() -> usize {
    MAX_MESSAGE_BYTES
}
fn default_true() -> bool {
    true
}
fn default_timeout_ms() -> u64 {
    5_000
}

impl RedisOptions {
    /// Defaults for `node` of `cluster` at `url`: 1,024 ranges, fsync required, 5 s timeout.
    pub fn new(
        url: impl Into<String>,
        cluster: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            cluster: cluster.into(),
            node: node.into(),
            ranges: default_ranges(),
            max_message_bytes: default_max_message_bytes(),
            require_fsync: true,
            timeout_ms: default_timeout_ms(),
        }
    }

    /// Checks every value, naming the option that is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, reason: String| Err(Error::InvalidOption { key, reason });
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if !name_ok(&self.cluster) {
            return bad(
                "journal.redis.cluster",
                format!(
                    "{:?}: use 1-64 ASCII letters, digits, '-', '_' or '.'",
                    self.cluster
                ),
            );
        }
        if !name_ok(&self.node) {
            return bad(
                "journal.redis.node",
                format!(
                    "{:?}: use 1-64 ASCII letters, digits, '-', '_' or '.'",
                    self.node
                ),
            );
        }
        if !(1..=65_536).contains(&self.ranges) {
            return bad(
                "journal.redis.ranges",
                format!("must be within 1..=65536, got {}", self.ranges),
            );
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_MESSAGE_BYTES {
            return bad(
                "journal.redis.max_message_bytes",
                format!("must be within 1..={MAX_MESSAGE_BYTES}"),
            );
        }
        if self.timeout_ms == 0 {
            return bad("journal.redis.timeout_ms", "must be above 0".into());
        }
        if redis::Client::open(self.url.as_str()).is_err() {
            // The URL may hold a password: name the key, not the value.
            return bad("journal.redis.url", "is not a valid redis:// URL".into());
        }
        Ok(())
    }
}

impl std::fmt::Debug for RedisOptions {
    /// The URL may carry a password: only where it points is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &super::location(&self.url))
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .field("ranges", &self.ranges)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("require_fsync", &self.require_fsync)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}
