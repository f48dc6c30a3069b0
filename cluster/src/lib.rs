//! Nodes of a SomaAgent cluster: membership, placement of durable actors by key, routing,
//! rebalancing on join and leave, and failover after node loss (ractor_cluster).
//!
//! Not built yet: this crate holds no code until its issue comes.
