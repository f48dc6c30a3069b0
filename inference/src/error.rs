use std::path::PathBuf;

/// What can go wrong loading a model or serving a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model file is missing, unreadable, not a model, or has the wrong shape.
    #[error("model file {path}: {detail}")]
    ModelFile {
        /// The file (or folder) that was being loaded.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The tokenizer could not be built or could not encode the input.
    #[error("tokenizer ({origin}): {detail}")]
    Tokenizer {
        /// Where the tokenizer came from (a file or the GGUF metadata).
        origin: String,
        /// What went wrong.
        detail: String,
    },
    /// The request itself is invalid (empty input, bad sampling parameters, too long).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The JSON schema uses something structured output does not support, or is malformed.
    #[error("unsupported JSON schema at {at}: {detail}")]
    Schema {
        /// JSON pointer of the offending part of the schema.
        at: String,
        /// What is unsupported or wrong.
        detail: String,
    },
    /// Structured output had not produced a complete value when `max_tokens` ran out.
    #[error(
        "structured output incomplete after {0} tokens (raise max_tokens or bound the schema with maxLength/maxItems)"
    )]
    IncompleteStructured(usize),
    /// The model computation failed.
    #[error("inference failed: {0}")]
    Compute(String),
    /// The replica serving the request failed or was killed before it finished.
    #[error("a replica of the {pool} pool stopped while serving the request")]
    ReplicaFailed {
        /// The pool (`embedder` or `generator`).
        pool: &'static str,
    },
    /// No replica of the pool is running (all restarting or the pool is shut down).
    #[error("the {0} pool has no running replica")]
    Unavailable(&'static str),
    /// The pool's request queue is full.
    #[error("the {0} pool's queue is full")]
    QueueFull(&'static str),
    /// The request waited longer than the queue timeout without being admitted.
    #[error("the request waited {0:?} in the queue without starting")]
    QueueTimeout(std::time::Duration),
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Something this build does not implement.
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn model(path: impl Into<PathBuf>, detail: impl std::fmt::Display) -> Self {
        Self::ModelFile {
            path: path.into(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn compute(e: impl std::fmt::Display) -> Self {
        Self::Compute(e.to_string())
    }

    pub(crate) fn schema(at: &str, detail: impl std::fmt::Display) -> Self {
        Self::Schema {
            at: if at.is_empty() { "/".into() } else { at.into() },
            detail: detail.to_string(),
        }
    }
}
