use std::path::PathBuf;

/// Everything that can go wrong in `soma-supervision`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The journal at `path` is damaged: a checksum, a header or the storage engine said so.
    #[error("journal at {path} is corrupt: {detail}")]
    Corrupt {
        /// The journal directory or file.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// The storage engine failed (I/O, flush).
    #[error("journal storage error at {path}: {source}")]
    Storage {
        /// The journal directory.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A message or a state could not be encoded.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// `message` or `state`.
        what: &'static str,
        /// The codec's words.
        detail: String,
    },
    /// A message or a state could not be decoded.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// `message` or `state`.
        what: &'static str,
        /// The codec's words.
        detail: String,
    },
    /// An actor key was rejected.
    #[error("invalid actor key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The actor's bounded mailbox is full and the registry rejects rather than waits.
    #[error("mailbox of {key} is full ({limit} messages in flight)")]
    MailboxFull {
        /// The actor key.
        key: String,
        /// The configured bound.
        limit: usize,
    },
    /// No dead letter with this key and sequence number.
    #[error("no dead letter for {key} at seq {seq}")]
    NoSuchDeadLetter {
        /// The actor key.
        key: String,
        /// The sequence number of the dead message.
        seq: u64,
    },
    /// The runtime or registry is shutting down or stopped after an escalation.
    #[error("{what} is stopped")]
    Stopped {
        /// What is stopped.
        what: &'static str,
    },
    /// A group-commit batch failed to append; nothing of it was acknowledged.
    #[error("journal append failed: {detail}")]
    Append {
        /// The backend's error, shared by every message of the batch.
        detail: String,
    },
    /// An option failed validation.
    #[error("invalid option {key}: {reason}")]
    InvalidOption {
        /// The option's name, e.g. `registry.max_in_flight`.
        key: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// Starting an actor failed.
    #[error("cannot start actor {name}: {detail}")]
    Spawn {
        /// The actor's name or key.
        name: String,
        /// Why it failed.
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}
