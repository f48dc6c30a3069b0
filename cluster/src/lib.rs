//! Nodes of a SomaAgent cluster: membership, placement of durable actors by key, routing,
//! rebalancing on join and leave, and failover after node loss (ractor_cluster).
//!
//! Built so far: [`Placement`], the shard-to-node map every node computes alike from the
//! member list, [`Membership`], the nodes' leases and states in Redis, and [`Shards`], each
//! shard's owner epoch in Redis, taken by compare-and-set, and [`RedisJournal`], the journal
//! backend of a cluster (its writes fenced by those epochs), and [`Node`], a runtime on it
//! whose shards follow the placement (hand-off on join and drain, failover after a node's
//! loss). Node links and routing of sends to their owner are not built yet.

mod error;
mod journal;
pub mod membership;
mod node;
mod placement;
pub mod shards;
mod status;

pub use error::{Error, Result};
pub use journal::{APPENDED, OP_SECONDS, OPS, RedisJournal, RedisOptions};
pub use membership::{Member, Membership, NodeState, Serving};
pub use node::{MOVES, Node, NodeView, REJOINS, SERVED};
pub use placement::{Move, NodeName, Placement, SLACK};
pub use shards::{Holder, Shards, Taken};
pub use status::{MemberStatus, Status, status};
