use std::path::PathBuf;

use crate::ids::{Epoch, KeyRange, Seq};

/// Why the journal refused a write (see [`Error::Fenced`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fence {
    /// The writer's epoch is not the range's current one (another owner acquired it, or
    /// the range was released).
    StaleEpoch {
        /// The range of the key.
        range: KeyRange,
        /// The epoch the writer held.
        epoch: Epoch,
        /// The range's current epoch here, `None` when this journal does not hold it.
        current: Option<Epoch>,
    },
    /// The range's holder is a cluster node whose lease has expired: it may no longer write
    /// (another node may take the range at any moment), even at its current epoch.
    LeaseExpired {
        /// The range of the key.
        range: KeyRange,
    },
    /// A commit or dead letter does not continue the key's committed sequence: another
    /// instance committed first (compare-and-set failed).
    NotNext {
        /// The first seq the write covers.
        from: Seq,
        /// The key's committed seq.
        applied: Seq,
    },
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fence::StaleEpoch {
                range,
                epoch,
                current: Some(c),
            } => write!(f, "epoch {epoch} of {range} is stale (current {c})"),
            Fence::StaleEpoch {
                range,
                epoch,
                current: None,
            } => write!(
                f,
                "epoch {epoch} of {range} is stale ({range} is not held here)"
            ),
            Fence::LeaseExpired { range } => {
                write!(f, "the lease of the node holding {range} has expired")
            }
            Fence::NotNext { from, applied } => write!(
                f,
                "it starts at seq {from} but the committed state covers {applied} (expected {})",
                applied + 1
            ),
        }
    }
}

/// Everything that can go wrong in `soma-supervision`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
        /// The journal file or directory.
        path: PathBuf,
        /// The operating system's (or the storage engine's) error.
        #[source]
        source: std::io::Error,
    },
    /// A journal backend reached over the network failed (a command error, a lost
    /// connection, a timeout). For a write the outcome is unknown: it may have landed.
    #[error("journal backend {backend} failed: {source}")]
    Backend {
        /// Which backend and where, without credentials (e.g. `redis 127.0.0.1:6379`).
        backend: String,
        /// The backend client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The journal refused a write of `key`: its writer no longer owns it.
    #[error("write to {key} refused: {reason}")]
    Fenced {
        /// The journal key.
        key: String,
        /// Why.
        reason: Fence,
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
    /// A message is larger than the journal accepts.
    #[error("message to {key} is {bytes} bytes, over the journal's limit of {limit} bytes")]
    TooLarge {
        /// The journal key.
        key: String,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The key's range is not owned by this runtime (another node owns it, or it was
    /// released).
    #[error("{key} is in {range}, which this runtime does not own")]
    NotOwned {
        /// The journal key.
        key: String,
        /// Its range.
        range: KeyRange,
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
    /// The runtime or registry is shutting down or stopped; the operation did nothing.
    #[error("{what} is stopped")]
    Stopped {
        /// What is stopped.
        what: &'static str,
    },
    /// The operation was handed to the journal but its answer was lost (the runtime stopped
    /// meanwhile): the message may or may not be durable.
    #[error("{what} stopped before answering: the outcome is unknown")]
    OutcomeUnknown {
        /// What stopped.
        what: &'static str,
    },
    /// The key failed more often than its restart intensity allows and waits out its window
    /// before it starts again.
    #[error(
        "actor {key} is parked after exceeding its restart intensity (retried in {retry_ms} ms)"
    )]
    Parked {
        /// The actor key.
        key: String,
        /// Milliseconds until it starts again by itself.
        retry_ms: u64,
    },
    /// A group-commit batch failed to append; nothing of it was acknowledged.
    #[error("journal append failed: {source}")]
    Append {
        /// The backend's error, shared by every message of the batch.
        #[source]
        source: std::sync::Arc<Error>,
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

impl Error {
    /// A storage error at `path`.
    pub(crate) fn storage(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Storage {
            path: path.to_path_buf(),
            source,
        }
    }
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
