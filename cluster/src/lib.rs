//! Nodes of a SomaAgent cluster: membership, placement of durable actors by key, routing,
//! rebalancing on join and leave, and failover after node loss (ractor_cluster).
//!
//! Built so far: [`Placement`], the shard-to-node map every node computes alike from the
//! member list, [`Membership`], the nodes' leases and states in Redis, and [`Shards`], each
//! shard's owner epoch in Redis, taken by compare-and-set, and [`RedisJournal`], the journal
//! backend of a cluster (its writes fenced by those epochs). Node links,
//! routing, hand-off and failover are not built yet.

mod error;
mod journal;
pub mod membership;
mod placement;
pub mod shards;
mod status;

pub use error::{Error, Result};
pub use journal::{APPENDED, OP_SECONDS, OPS, RedisJournal, RedisOptions};
pub use membership::{Member, Membership, NodeState, Serving};
pub use placement::{Move, NodeName, Placement, SLACK};
pub use shards::{Holder, Shards, Taken};
pub use status::{MemberStatus, Status, status};
