//! The payload schemas of the topics, one versioned struct per topic (`docs/events.md`).
//!
//! Versioning: adding an optional field keeps the version; anything else (removing, renaming,
//! changing a type or a meaning) makes a new version. A consumer decodes only the version its
//! type names and reports any other as an error naming both.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Envelope, Topic};
use crate::error::{Error, Result};

/// A typed payload of one topic, at one schema version.
pub trait TopicEvent: Serialize + DeserializeOwned {
    /// The topic it is published to.
    const TOPIC: Topic;
    /// Its schema version.
    const VERSION: u32;
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The policy allowed it and it succeeded.
    Succeeded,
    /// The policy allowed it and it failed.
    Failed,
    /// The policy refused it.
    Denied,
    /// It waits for a human approval.
    PendingApproval,
}

/// `agent.audit/v1`: an action an actor took, or was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// The acting actor (`agent/<id>`, `project/<id>/task/<id>`, `tool/<name>`).
    pub actor: String,
    /// What it did (`tool.call`, `message.send`, `task.start`, ...).
    pub action: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The session, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Action-specific detail.
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl TopicEvent for AuditEvent {
    const TOPIC: Topic = Topic::AgentAudit;
    const VERSION: u32 = 1;
}

/// `conversation.events/v1`: a message or tool exchange of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationEvent {
    /// The session.
    pub session: String,
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// `message`, `tool_call` or `tool_result`.
    pub kind: String,
    /// The text (or the tool call's JSON arguments).
    pub content: String,
}

impl TopicEvent for ConversationEvent {
    const TOPIC: Topic = Topic::ConversationEvents;
    const VERSION: u32 = 1;
}

/// `slm.requests/v1`: one request to a local model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlmRequest {
    /// The request's id.
    pub request_id: String,
    /// The model.
    pub model: String,
    /// `generate` or `embed`.
    pub kind: String,
    /// Tokens in.
    pub prompt_tokens: u32,
    /// Tokens out (0 for embeddings).
    pub completion_tokens: u32,
    /// Wall time in milliseconds.
    pub latency_ms: u64,
    /// `ok`, `cancelled` or `error`.
    pub status: String,
}

impl TopicEvent for SlmRequest {
    const TOPIC: Topic = Topic::SlmRequests;
    const VERSION: u32 = 1;
}

/// `training.audit/v1`: what went into training data, or was erased from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingAudit {
    /// The dataset.
    pub dataset: String,
    /// The sample.
    pub sample_id: String,
    /// `included`, `excluded` or `erased`.
    pub action: String,
    /// Why.
    pub reason: String,
}

impl TopicEvent for TrainingAudit {
    const TOPIC: Topic = Topic::TrainingAudit;
    const VERSION: u32 = 1;
}

/// `policy.decisions/v1`: one decision of a tenant's constitution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    /// The Rego query (`data.soma.allow`).
    pub query: String,
    /// Allowed or not.
    pub allowed: bool,
    /// The reasons the policy gave.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// A digest of the input (never the input itself: it may hold secrets).
    pub input_digest: String,
    /// The policy's version.
    pub policy_version: String,
}

impl TopicEvent for PolicyDecision {
    const TOPIC: Topic = Topic::PolicyDecisions;
    const VERSION: u32 = 1;
}

pub(super) fn schema_name<E: TopicEvent>() -> String {
    format!("{}/v{}", E::TOPIC.name(), E::VERSION)
}

/// The topic named by a schema string `<topic>/v<n>`.
pub(super) fn topic_of(schema: &str) -> Result<Topic> {
    let bad = |reason| Error::Invalid {
        what: "event schema",
        value: schema.chars().take(64).collect(),
        reason,
    };
    let (topic, version) = schema
        .split_once("/v")
        .ok_or_else(|| bad("is not of the form <topic>/v<version>"))?;
    version
        .parse::<u32>()
        .map_err(|_| bad("has a version that is not a number"))?;
    Topic::parse(topic)
}

pub(super) fn decode<E: TopicEvent>(envelope: &Envelope) -> Result<E> {
    let want = schema_name::<E>();
    if envelope.schema != want {
        return Err(Error::Schema {
            id: envelope.id.clone(),
            found: envelope.schema.clone(),
            expected: want,
            detail: "the schema differs".into(),
        });
    }
    serde_json::from_value(envelope.payload.clone()).map_err(|e| Error::Schema {
        id: envelope.id.clone(),
        found: envelope.schema.clone(),
        expected: want,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_round_trip_and_mismatches_are_named() {
        let event = AuditEvent {
            actor: "agent/1".into(),
            action: "tool.call".into(),
            outcome: Outcome::Denied,
            session: None,
            detail: serde_json::json!({"tool": "shell"}),
        };
        let e = Envelope::new("e1", "acme", 5, &event).unwrap();
        assert_eq!(e.schema, "agent.audit/v1");
        assert_eq!(e.topic().unwrap(), Topic::AgentAudit);
        assert_eq!(e.decode::<AuditEvent>().unwrap(), event);
        let err = e.decode::<PolicyDecision>().unwrap_err().to_string();
        assert!(
            err.contains("agent.audit/v1") && err.contains("policy.decisions/v1"),
            "{err}"
        );
        assert!(topic_of("agent.audit").is_err());
        assert!(topic_of("nope/v1").is_err());
        assert!(topic_of("agent.audit/vx").is_err());
    }
}
