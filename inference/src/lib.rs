//! The candle model pool: supervised embedder and generator actors with dynamic batching,
//! token streaming and schema-constrained output, on CPU (CUDA behind the `cuda` feature).
//!
//! - [`EmbeddingModel`]: a BERT-family encoder (Hugging Face folder), mean pooling over real
//!   tokens, L2 normalisation, padding to the longest text of a batch.
//! - [`GenerationModel`]: a quantized llama-family GGUF with the tokenizer and chat template
//!   it carries; Q4_1 weights re-quantized at load ([`Quantization`]).
//! - [`EmbedderPool`] and [`GeneratorPool`]: N replicas each, supervised (a failed replica
//!   restarts and its in-flight requests get [`Error::ReplicaFailed`]), least-loaded
//!   routing, dynamic batching of embeddings, streamed generation with cancellation.
//! - [`JsonSchema`]: structured output constrained to a JSON schema.

mod device;
mod embed;
mod error;
mod generate;
mod gguf;
mod gguf_check;
mod metrics;
mod native;
mod pool;
mod sample;
mod schema;
mod tools;

pub use device::{DeviceChoice, Engine, check_environment, cpu_threads};
pub use embed::EmbeddingModel;
pub use error::{Error, Result};
pub use generate::{
    ChatMessage, Completion, FinishReason, GenerateRequest, GenerationEvent, GenerationModel,
    GeneratorOptions, Prompt, Usage,
};
pub use gguf::Quantization;
pub use pool::{
    BatchStats, EmbedderConfig, EmbedderPool, GenerationStream, GeneratorConfig, GeneratorPool,
    PoolStats,
};
pub use sample::{MAX_STOP_SEQUENCES, SamplingParams};
pub use schema::{JsonSchema, Matcher};
pub use tools::{ToolChoice, ToolSpec, ToolStep, decide_tool, describe_tools};
