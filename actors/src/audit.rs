//! What the domain publishes about itself: every constitution decision on `policy.decisions`
//! and `agent.audit` (with the constitution's hash), and audit events of actions such as a
//! tenant's erasure, on the runtime's event stream when it has one.
//!
//! Publishing is part of the action: a decision returns once its events are durable in the
//! stream, so what was decided is never missing from the audit trail (a crash after the
//! publish and before the action may leave an event of an action that did not happen).

use std::sync::Arc;

use sha2::{Digest, Sha256};
use soma_adapters::{AuditEvent, Envelope, EventStream, Outcome, PolicyDecision, Topic};

use crate::constitution::{Decision, DecisionInput, Verdict, hex};
use crate::error::Result;

/// Where the domain's events go (nowhere without a stream).
#[derive(Debug, Clone, Default)]
pub(crate) struct Audit {
    events: Option<Arc<dyn EventStream>>,
}

fn event_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl Audit {
    pub(crate) fn new(events: Option<Arc<dyn EventStream>>) -> Self {
        Self { events }
    }

    /// Publishes `verdict` on `input` to `policy.decisions` and `agent.audit`.
    pub(crate) async fn decision(
        &self,
        input: &DecisionInput,
        verdict: &Verdict,
        at_ms: u64,
    ) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        let (allowed, reasons, outcome) = match &verdict.decision {
            Decision::Allow => (true, Vec::new(), Outcome::Succeeded),
            Decision::Deny { reasons } => (false, reasons.clone(), Outcome::Denied),
            Decision::Escalate { reasons } => (false, reasons.clone(), Outcome::PendingApproval),
        };
        // A digest of the input, never the input itself (it may hold secrets).
        let digest = hex(&Sha256::digest(
            serde_json::to_vec(input).unwrap_or_default(),
        ));
        let decision = PolicyDecision {
            query: "data.soma.decide.result".into(),
            allowed,
            reasons: reasons.clone(),
            input_digest: digest.clone(),
            policy_version: format!("{} v{}", verdict.constitution, verdict.version),
        };
        let envelope = Envelope::new(event_id(), &input.tenant, at_ms, &decision)?;
        events
            .publish(Topic::PolicyDecisions, &input.tenant, &envelope)
            .await?;
        let session = input.actor.strip_prefix("session/").map(str::to_string);
        let audit = AuditEvent {
            actor: input.actor.clone(),
            action: input.action.name().into(),
            outcome,
            session,
            detail: serde_json::json!({
                "decision": verdict.decision.name(),
                "reasons": reasons,
                "constitution": verdict.constitution,
                "version": verdict.version,
                "principal": input.principal.id,
                "input_digest": digest,
            }),
        };
        let envelope = Envelope::new(event_id(), &input.tenant, at_ms, &audit)?;
        events
            .publish(Topic::AgentAudit, &input.tenant, &envelope)
            .await?;
        Ok(())
    }

    /// Publishes an audit event of `tenant`.
    pub(crate) async fn event(&self, tenant: &str, event: &AuditEvent, at_ms: u64) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        let envelope = Envelope::new(event_id(), tenant, at_ms, event)?;
        events.publish(Topic::AgentAudit, tenant, &envelope).await?;
        Ok(())
    }
}
