//! The candle model pool: supervised embedder and generator actors with dynamic batching,
//! token streaming and schema-constrained output, on CPU (CUDA behind a feature).
//!
//! Not built yet: this crate holds no code until its issue comes.
