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
    /// The tenant has no constitution.
    #[error("tenant {0:?} has no constitution")]
    NoConstitution(String),
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
