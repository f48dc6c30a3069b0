//! Metric names of the pool (`soma_inference_*`), exported at `/metrics` by the host.

/// Requests, by `pool` and `outcome` (`ok`, `error`, `cancelled`, `replica_failed`).
pub(crate) const REQUESTS: &str = "soma_inference_requests_total";
/// Requests accepted and not yet started, by `pool`.
pub(crate) const QUEUE_DEPTH: &str = "soma_inference_queue_depth";
/// Texts per embedding forward pass.
pub(crate) const BATCH_SIZE: &str = "soma_inference_batch_size";
/// Seconds from accepting a request to its result (embeddings) or last token (generation).
pub(crate) const REQUEST_SECONDS: &str = "soma_inference_request_duration_seconds";
/// Generated tokens per second of each generation (after the first token).
pub(crate) const TOKENS_PER_SECOND: &str = "soma_inference_tokens_per_second";
/// Seconds from accepting a generation request to its first token.
pub(crate) const TTFT_SECONDS: &str = "soma_inference_time_to_first_token_seconds";
/// Tokens, by `kind` (`prompt`, `completion`).
pub(crate) const TOKENS: &str = "soma_inference_tokens_total";
/// Replica restarts, by `pool`.
pub(crate) const REPLICA_STARTS: &str = "soma_inference_replica_starts_total";
