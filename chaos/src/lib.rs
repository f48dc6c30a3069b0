//! Fault injection and invariant checking: kills actors and nodes under load and proves that
//! nothing acknowledged was lost and nothing was applied twice (library, CLI and tests).
//!
//! Not built yet: this crate holds no code until its issue comes.
