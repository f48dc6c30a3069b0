//! The outside world behind traits: vector and episodic memory, event streams and tool
//! adapters, each with an embedded default and a server backend.
//!
//! Not built yet: this crate holds no code until its issue comes.
