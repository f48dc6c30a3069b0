/// What can go wrong in the cluster layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A node name outside the alphabet (1-64 of ASCII letters, digits, `-`, `_`, `.`).
    #[error("invalid node name {0:?}: use 1-64 ASCII letters, digits, '-', '_' or '.'")]
    InvalidNodeName(String),
    /// A placement over no nodes.
    #[error("no up nodes to place shards on")]
    NoNodes,
    /// More members than a placement indexes.
    #[error("{0} nodes: a placement holds at most 65535")]
    TooManyNodes(usize),
    /// A setting out of range, named by its configuration key.
    #[error("invalid {key}: {reason}")]
    Config {
        /// The configuration key.
        key: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The coordination store failed or could not be reached.
    #[error("redis: {0}")]
    Redis(String),
    /// This incarnation no longer holds its lease (it expired, or a newer incarnation of the
    /// node took it): it must serve nothing.
    #[error("node {node} incarnation {incarnation} no longer holds its lease")]
    LeaseLost {
        /// The node.
        node: crate::NodeName,
        /// Its incarnation.
        incarnation: u64,
    },
    /// Another live incarnation holds the shard: it must release it first (or lose its
    /// lease).
    #[error("{shard} is held by node {holder} incarnation {incarnation}")]
    ShardHeld {
        /// The shard.
        shard: soma_supervision::KeyRange,
        /// Its holder.
        holder: crate::NodeName,
        /// The holder's incarnation.
        incarnation: u64,
    },
    /// A release by an incarnation that does not hold the shard at that epoch.
    #[error("{shard} is not held by this incarnation at epoch {epoch}")]
    NotHolder {
        /// The shard.
        shard: soma_supervision::KeyRange,
        /// The epoch the caller thought it held.
        epoch: soma_supervision::Epoch,
    },
    /// The node's journal or runtime failed.
    #[error("journal: {0}")]
    Journal(#[from] soma_supervision::Error),
    /// A row of the membership table that does not parse.
    #[error("membership row of {node:?} is damaged: {detail}")]
    BadMember {
        /// The row's field name.
        node: String,
        /// What is wrong.
        detail: String,
    },
}

impl Error {
    pub(crate) fn redis(e: redis::RedisError) -> Self {
        // The error's text names the failure and the address, never the URL's password.
        Self::Redis(e.to_string())
    }
}

/// The cluster layer's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
