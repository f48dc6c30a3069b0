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
/// Seconds a generation request waited before its first admission into a batch.
pub(crate) const QUEUE_WAIT_SECONDS: &str = "soma_inference_queue_wait_seconds";
/// Seconds between two tokens of one generation.
pub(crate) const INTER_TOKEN_SECONDS: &str = "soma_inference_inter_token_seconds";
/// Sequences run together in one batch step.
pub(crate) const BATCH_SEQUENCES: &str = "soma_inference_batch_sequences";
/// Key-value cache blocks in use (16 positions each).
pub(crate) const KV_BLOCKS: &str = "soma_inference_kv_blocks";
/// Prompt tokens taken from the prefix cache instead of recomputed.
pub(crate) const PREFIX_TOKENS: &str = "soma_inference_prefix_tokens_total";
/// Sequences preempted for key-value memory.
pub(crate) const PREEMPTIONS: &str = "soma_inference_preemptions_total";
/// Tokens by `tenant` and `kind` (`prompt`, `completion`).
pub(crate) const TENANT_TOKENS: &str = "soma_inference_tenant_tokens_total";
