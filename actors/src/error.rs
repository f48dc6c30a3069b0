//! The crate's error.

/// What the domain can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A constitution did not compile; the message is the Rego compiler's.
    #[error("the constitution does not compile: {message}")]
    PolicyCompile {
        /// The compiler's message.
        message: String,
    },
    /// A constitution's data document is not a JSON object.
    #[error("the constitution's data must be a JSON object")]
    PolicyData,
    /// Evaluating a decision failed (the policy is broken for this input, or over its
    /// time budget). The action is denied.
    #[error("the policy could not decide: {message}")]
    PolicyEval {
        /// What went wrong.
        message: String,
    },
    /// An id is not 1-64 of `a-z 0-9 - _`.
    #[error("{0:?} is not an id (1-64 of a-z, 0-9, '-', '_')")]
    InvalidId(String),
    /// No such entity (of this tenant).
    #[error("no {what} {id:?}")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The entity exists already.
    #[error("{what} {id:?} exists already")]
    AlreadyExists {
        /// What.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A constitution's version must be above the current one.
    #[error("constitution version {given} is not above the current {current}")]
    StaleVersion {
        /// The current version.
        current: u64,
        /// The version given.
        given: u64,
    },
    /// A period ends before it starts.
    #[error("the period from {from_ms} to {to_ms} ends before it starts")]
    InvalidRange {
        /// Start, ms since the Unix epoch.
        from_ms: u64,
        /// End.
        to_ms: u64,
    },
    /// The durable-actor runtime failed.
    #[error(transparent)]
    Runtime(#[from] soma_supervision::Error),
    /// The tenant has no constitution.
    #[error("tenant {0:?} has no constitution")]
    NoConstitution(String),
    /// A tool cannot be registered.
    #[error("tool {name:?}: {reason}")]
    InvalidTool {
        /// Its name.
        name: String,
        /// Why not.
        reason: String,
    },
    /// Parts that do not fit together.
    #[error("configuration: {0}")]
    Config(String),
    /// Approve or reject of something that waits for no approval.
    #[error("{what} {id:?} is not waiting for an approval")]
    NotAwaiting {
        /// What.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A quota of the tenant is used up.
    #[error("the tenant's quota of {limit} {what} is used up")]
    QuotaExceeded {
        /// What is limited.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// Handling the request failed too often: it is in the dead letters.
    #[error("{what} {id:?} failed too often and was moved to the dead letters")]
    DeadLettered {
        /// What it is.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A request that cannot be served as asked.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A subscriber fell too far behind and was ended.
    #[error(
        "subscriber of session {session:?} missed {missed} updates; resubscribe from seq {resume_from}"
    )]
    Lagged {
        /// The session.
        session: String,
        /// Updates missed.
        missed: u64,
        /// The seq to resubscribe from.
        resume_from: u64,
    },
    /// A plan that cannot run (the task it concerns, when one does).
    #[error("invalid plan{}: {reason}", task.as_ref().map(|t| format!(" (task {t:?})")).unwrap_or_default())]
    InvalidPlan {
        /// The task at fault, if one is.
        task: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The request needs something that has ended (a killed, failed or finished project).
    #[error("{what} {id:?} has ended ({status})")]
    Ended {
        /// What.
        what: &'static str,
        /// Its id.
        id: String,
        /// How it ended.
        status: String,
    },
    /// A subscriber asked for events that are no longer kept.
    #[error("events before seq {oldest} of {what} {id:?} are no longer kept")]
    EventsGone {
        /// What.
        what: &'static str,
        /// Its id.
        id: String,
        /// The oldest seq kept.
        oldest: u64,
    },
    /// Inference failed.
    #[error(transparent)]
    Inference(#[from] soma_inference::Error),
    /// Memory or events failed.
    #[error(transparent)]
    Adapters(#[from] soma_adapters::Error),
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
