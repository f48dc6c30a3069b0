//! Tools an agent can call: one trait ([`Tool`]: name, description, JSON schema of its
//! arguments, run) and a [`ToolRegistry`] of them. Built in: `memory.remember`,
//! `memory.recall` ([`memory`]) and `http.request` ([`http`]).
//!
//! A tool is run by a tool-call actor (see [`crate::ToolCalls`]): authorized by the
//! tenant's constitution, with a timeout and retries, its result journaled before the call
//! is acknowledged. A tool run again after a crash gets the same idempotency key; a tool
//! that honours it has its effect once.

mod http;
mod memory;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use soma_inference::{JsonSchema, ToolSpec};

use crate::error::{Error, Result};

pub use http::{HttpLimits, HttpRequestTool};
pub use memory::{Memory, RecallTool, Recalled, RememberTool};

/// One run of a tool.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The tenant the call belongs to.
    pub tenant: String,
    /// The session that asked, if any.
    pub session: Option<String>,
    /// The call's idempotency key: the same for every run of one call.
    pub idempotency_key: String,
    /// Which attempt this is (1 for the first).
    pub attempt: u32,
    /// The arguments, valid against the tool's schema.
    pub arguments: Value,
}

/// What kind of failure a tool run ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolErrorKind {
    /// The arguments do not fit the tool.
    InvalidArguments,
    /// A failure that may pass: retried with backoff.
    Retryable,
    /// The run took longer than the tool's timeout (retried).
    TimedOut,
    /// A failure that will not pass by retrying.
    Failed,
    /// The constitution refused the call.
    Denied,
    /// A human rejected the call.
    Rejected,
    /// No tool of that name is registered (or the persona does not allow it).
    UnknownTool,
    /// Its caller cancelled the call while it ran (a project was killed or failed).
    Cancelled,
}

impl ToolErrorKind {
    /// Whether a run that failed so is tried again.
    pub fn retryable(self) -> bool {
        matches!(self, ToolErrorKind::Retryable | ToolErrorKind::TimedOut)
    }
}

/// A failed tool run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    /// What kind of failure.
    pub kind: ToolErrorKind,
    /// What happened, for the model and the audit trail.
    pub message: String,
}

impl ToolError {
    /// A failure of `kind`.
    pub fn new(kind: ToolErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Bad arguments.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ToolErrorKind::InvalidArguments, message)
    }

    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(ToolErrorKind::Retryable, message)
    }

    /// A failure not worth retrying.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ToolErrorKind::Failed, message)
    }
}

/// A tool.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// Its name (`memory.recall`, ...): 1-64 of `a-z A-Z 0-9 . _ -`.
    fn name(&self) -> &str;
    /// What it does, as the model is told.
    fn description(&self) -> &str;
    /// The JSON schema of its arguments (an object).
    fn parameters(&self) -> Value;
    /// How long one run may take.
    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
    /// Runs it.
    async fn run(&self, call: &Invocation) -> Result<Value, ToolError>;
}

struct Registered {
    tool: Arc<dyn Tool>,
    schema: JsonSchema,
}

/// The tools of a runtime, by name.
#[derive(Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Registered>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ToolRegistry {
    /// No tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `tool`; its name must be new and its schema one the generator can follow.
    pub fn register(&mut self, tool: impl Tool) -> Result<()> {
        self.register_arc(Arc::new(tool))
    }

    /// As [`register`](Self::register), for a shared tool.
    pub fn register_arc(&mut self, tool: Arc<dyn Tool>) -> Result<()> {
        let name = tool.name().to_string();
        if !valid_name(&name) {
            return Err(Error::InvalidTool {
                name,
                reason: "a name is 1-64 of a-z, A-Z, 0-9, '.', '_', '-'".into(),
            });
        }
        if self.tools.contains_key(&name) {
            return Err(Error::InvalidTool {
                name,
                reason: "a tool of that name is registered already".into(),
            });
        }
        let schema = JsonSchema::compile(&tool.parameters()).map_err(|e| Error::InvalidTool {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        self.tools.insert(name, Registered { tool, schema });
        Ok(())
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        self.tools.get(name).map(|r| r.tool.clone())
    }

    /// The registered names.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    /// What the model is told of the tools in `names` that are registered.
    pub fn specs(&self, names: &[String]) -> Vec<ToolSpec> {
        names
            .iter()
            .filter_map(|n| self.tools.get(n))
            .map(|r| ToolSpec {
                name: r.tool.name().to_string(),
                description: r.tool.description().to_string(),
                parameters: r.tool.parameters(),
            })
            .collect()
    }

    /// Checks `arguments` against the schema of tool `name`.
    pub fn check(&self, name: &str, arguments: &Value) -> Result<(), ToolError> {
        let Some(r) = self.tools.get(name) else {
            return Err(ToolError::new(
                ToolErrorKind::UnknownTool,
                format!("no tool {name:?}"),
            ));
        };
        let text = arguments.to_string();
        let mut m = r.schema.matcher();
        if m.feed_all(text.as_bytes()) && m.can_end() {
            Ok(())
        } else {
            Err(ToolError::invalid(format!(
                "the arguments of {name} do not match its schema {}",
                r.schema.source()
            )))
        }
    }
}

/// A string argument.
pub(crate) fn str_arg<'a>(args: &'a Value, key: &str) -> Result<&'a str, ToolError> {
    args.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ToolError::invalid(format!("argument {key:?} must be a string")))
}
