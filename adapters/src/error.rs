use std::path::PathBuf;

/// Everything that can go wrong in `soma-adapters`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tenant, session or other identifier was rejected.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// What was invalid (`tenant`, `session`, `limit`, ...).
        what: &'static str,
        /// The value as given (shortened).
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The embedded store failed.
    #[error("store at {path} failed: {source}")]
    Store {
        /// The store's directory.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A server backend failed or is unreachable (the address never includes credentials).
    #[error("{server} at {address} failed: {detail}")]
    Server {
        /// Which kind of server (`redis`, ...).
        server: &'static str,
        /// Host and port.
        address: String,
        /// The client's words.
        detail: String,
    },
    /// A vector does not have the memory's dimension.
    #[error("vector has {found} values, the memory's dimension is {expected}")]
    Dimension {
        /// The memory's dimension.
        expected: usize,
        /// The vector's length.
        found: usize,
    },
    /// An event's payload is not in the schema its reader expects.
    #[error("event {id} has schema {found}, expected {expected}: {detail}")]
    Schema {
        /// The event's id.
        id: String,
        /// The schema the event names.
        found: String,
        /// The schema the reader decodes.
        expected: String,
        /// What is wrong.
        detail: String,
    },
    /// A stored record could not be read back.
    #[error("store at {path} holds a damaged record: {detail}")]
    Corrupt {
        /// The store's directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
