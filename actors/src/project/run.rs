//! Runners: the work of one task run (or one compensation) outside the project's handler,
//! reporting back to the project as a message. A runner starts once the message that
//! dispatched it is handled, runs under the tenant's parallelism limit and the constitution
//! (`task.start`, then the tool call's or the model's own decision), and can be cancelled.
//!
//! A run cut by a crash runs again after the restart with the same attempt number: a tool
//! task's call id is derived from (project, task, attempt), so a call whose result was
//! journaled is read back, not run again; a call cut mid-run runs again with the same
//! idempotency key.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use soma_inference::{
    ChatMessage, GenerateRequest, GenerationEvent, GeneratorPool, Prompt, SamplingParams,
};
use soma_supervision::WeakRegistry;
use tokio::sync::watch;

use super::machine::{Gate, RunOutcome};
use super::plan::{Resolver, TaskKind, TaskSpec};
use super::{ProjectMsg, Shared};
use crate::constitution::{Action, Decision, Principal, PrincipalKind};
use crate::error::Error;
use crate::toolcall::{CallRequest, CallStatus, now_ms};
use crate::tools::ToolErrorKind;

/// One run to carry out.
pub(crate) struct Job {
    pub(crate) key: String,
    /// The project message whose handler dispatched it.
    pub(crate) seq: u64,
    pub(crate) task: u32,
    pub(crate) attempt: u32,
    pub(crate) spec: TaskSpec,
    pub(crate) goal: String,
    pub(crate) user: String,
    /// The outputs it references, by task id.
    pub(crate) inputs: BTreeMap<String, Value>,
    /// A human approved it (its start is not decided again; an escalated tool call of it is
    /// approved with this decision).
    pub(crate) decided: Option<super::machine::Decided>,
    /// The approval of its escalated tool call, when it goes on right after one.
    pub(crate) approve_call: Option<super::machine::Decided>,
    /// A compensation rather than the task itself.
    pub(crate) undo: bool,
}

impl Job {
    pub(crate) fn work(&self) -> super::Work {
        if self.undo {
            super::Work::Undo(self.task)
        } else {
            super::Work::Run(self.task)
        }
    }

    fn tenant(&self) -> &str {
        crate::toolcall::split_key(&self.key).0
    }

    fn project(&self) -> &str {
        crate::toolcall::split_key(&self.key).1
    }

    fn principal(&self) -> Principal {
        Principal {
            kind: PrincipalKind::User,
            id: self.user.clone(),
            roles: Vec::new(),
        }
    }

    /// The tool-call id of this run: readable, unique per (project, task, attempt).
    pub(crate) fn call_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.project().as_bytes());
        h.update([0]);
        h.update(self.spec.id.as_bytes());
        let digest = h.finalize();
        let tag = crate::constitution::hex(&digest[..6]);
        if self.undo {
            format!("kq-{}-{tag}-undo", self.project())
        } else {
            format!("kq-{}-{tag}-{}", self.project(), self.attempt)
        }
    }
}

fn failed(error: impl std::fmt::Display, retryable: bool) -> RunOutcome {
    RunOutcome::Failed {
        error: error.to_string(),
        retryable,
    }
}

impl Shared {
    /// Runs `job` and reports how it ended to the project.
    pub(crate) async fn run(self: Arc<Self>, job: Job, mut cancel: watch::Receiver<bool>) {
        let Some(registry) = self.registry.get().and_then(WeakRegistry::upgrade) else {
            self.finished(&job);
            return;
        };
        // Only once the dispatching handler has committed (or its message was given up).
        if registry.wait_handled(&job.key, job.seq).await.is_err() {
            self.finished(&job);
            return;
        }
        let slots = self.tenant_slots(job.tenant());
        let permit = tokio::select! {
            p = slots.acquire_owned() => p.ok(),
            _ = cancel.wait_for(|c| *c) => None,
        };
        let started = std::time::Instant::now();
        let outcome = match permit {
            None => RunOutcome::Cancelled,
            Some(_permit) if job.undo => self.tool(&job, &mut cancel).await,
            Some(_permit) => match self.start_gate(&job).await {
                Some(stop) => stop,
                None => match job.spec.kind {
                    TaskKind::Tool => self.tool(&job, &mut cancel).await,
                    TaskKind::Agent => self.agent(&job, &mut cancel).await,
                    TaskKind::Approval => failed("an approval task has no run", false),
                },
            },
        };
        let label = match &outcome {
            RunOutcome::Done { .. } => "done",
            RunOutcome::Failed { .. } => "failed",
            RunOutcome::Gated { .. } => "gated",
            RunOutcome::Cancelled => "cancelled",
        };
        metrics::counter!("soma_project_task_runs_total", "outcome" => label).increment(1);
        metrics::histogram!("soma_project_task_run_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let msg = if job.undo {
            let error = match outcome {
                RunOutcome::Done { .. } => None,
                RunOutcome::Failed { error, .. } => Some(error),
                RunOutcome::Gated { .. } => Some(format!(
                    "the compensation's tool call {} waits for an approval",
                    job.call_id()
                )),
                RunOutcome::Cancelled => Some("cancelled".into()),
            };
            ProjectMsg::Compensated {
                task: job.task,
                error,
            }
        } else {
            ProjectMsg::Ran {
                task: job.task,
                attempt: job.attempt,
                outcome,
            }
        };
        // Done before the report: the report's handling may dispatch the same work again (the
        // next compensation, a run resumed after an approval).
        self.finished(&job);
        if let Err(e) = registry.send(&job.key, &msg).await {
            // The runtime stops: the run is resumed from the state after the restart.
            tracing::warn!(project = %job.key, task = %job.spec.id, error = %e, "cannot report a task run");
        }
    }

    /// The constitution's word on starting the task (`None`: go).
    async fn start_gate(&self, job: &Job) -> Option<RunOutcome> {
        if job.decided.is_some() {
            return None;
        }
        let resource = json!({
            "tenant": job.tenant(),
            "project": job.project(),
            "task": job.spec.id,
            "kind": job.spec.kind,
            "tool": job.spec.tool,
        });
        let verdict = self
            .deps
            .tenants
            .decide(
                job.tenant(),
                job.principal(),
                &format!("project/{}", job.project()),
                Action::TaskStart,
                resource,
                now_ms(),
            )
            .await;
        match verdict {
            Ok(v) => match v.decision {
                Decision::Allow => None,
                Decision::Deny { reasons } => Some(failed(
                    format!("denied by the constitution: {}", reasons.join("; ")),
                    false,
                )),
                Decision::Escalate { reasons } => Some(RunOutcome::Gated {
                    gate: Gate::Start { reasons },
                }),
            },
            Err(e @ Error::NotFound { .. }) => Some(failed(e, false)),
            Err(e) => Some(failed(
                format!("the constitution could not decide: {e}"),
                true,
            )),
        }
    }

    async fn tool(&self, job: &Job, cancel: &mut watch::Receiver<bool>) -> RunOutcome {
        let (tool, arguments) = if job.undo {
            match &job.spec.compensation {
                Some(c) => (c.tool.clone(), c.arguments.clone()),
                None => return failed("the task has no compensation", false),
            }
        } else {
            (
                job.spec.tool.clone().unwrap_or_default(),
                job.spec.arguments.clone().unwrap_or_else(|| json!({})),
            )
        };
        let resolver = Resolver {
            goal: &job.goal,
            outputs: &job.inputs,
        };
        let arguments = match resolver.json(&arguments) {
            Ok(a) => a,
            Err(e) => return failed(format!("resolving the arguments: {e}"), false),
        };
        let calls = &self.deps.tool_calls;
        let (tenant, id) = (job.tenant(), job.call_id());
        let req = CallRequest {
            tool,
            arguments: arguments.to_string(),
            principal: job.principal(),
            session: None,
        };
        // A call the constitution escalated and a human approved through the project.
        if let Some(d) = &job.approve_call
            && let Ok(r) = calls.get(tenant, &id).await
            && matches!(r.status, Some(CallStatus::Awaiting { .. }))
        {
            match calls.approve(tenant, &id, &d.by, &d.comment).await {
                Ok(_) | Err(Error::NotAwaiting { .. }) => {}
                Err(e) => return failed(format!("approving the tool call: {e}"), true),
            }
        }
        let call = calls.call(tenant, &id, req);
        tokio::pin!(call);
        let first = tokio::select! {
            r = &mut call => Some(r),
            _ = cancel.wait_for(|c| *c) => None,
        };
        let cancelled = first.is_none();
        let record = match first {
            Some(r) => r,
            None => {
                if let Err(e) = calls.cancel(tenant, &id) {
                    tracing::warn!(call = %id, error = %e, "cannot cancel a tool call");
                }
                call.await
            }
        };
        if cancelled {
            calls.forget_cancel(tenant, &id);
        }
        let record = match record {
            Ok(r) => r,
            Err(_) if cancelled => return RunOutcome::Cancelled,
            Err(e @ (Error::NotFound { .. } | Error::DeadLettered { .. })) => {
                return failed(e, false);
            }
            Err(e) => return failed(e, true),
        };
        match record.status {
            Some(CallStatus::Done { result }) => RunOutcome::Done { output: result },
            Some(CallStatus::Awaiting { .. }) if cancelled => RunOutcome::Cancelled,
            Some(CallStatus::Awaiting { reasons }) => RunOutcome::Gated {
                gate: Gate::ToolCall {
                    call: id.clone(),
                    reasons,
                },
            },
            Some(CallStatus::Failed { .. }) if cancelled => RunOutcome::Cancelled,
            Some(CallStatus::Failed { error }) => match error.kind {
                ToolErrorKind::Cancelled => RunOutcome::Cancelled,
                k => failed(format!("{}: {}", record.tool, error.message), k.retryable()),
            },
            None if cancelled => RunOutcome::Cancelled,
            None => failed("the tool call ended without an outcome", true),
        }
    }

    async fn agent(&self, job: &Job, cancel: &mut watch::Receiver<bool>) -> RunOutcome {
        let Some(model) = job.spec.model.clone().or_else(|| self.default_model()) else {
            return failed("no model is loaded for agent tasks", false);
        };
        let Some(pool) = self.deps.generators.get(&model).cloned() else {
            return failed(format!("model {model:?} is not loaded"), false);
        };
        let resolver = Resolver {
            goal: &job.goal,
            outputs: &job.inputs,
        };
        let prompt = match resolver.text(job.spec.prompt.as_deref().unwrap_or_default()) {
            Ok(p) => p,
            Err(e) => return failed(format!("resolving the prompt: {e}"), false),
        };
        let tenant = job.tenant();
        let verdict = self
            .deps
            .tenants
            .decide(
                tenant,
                job.principal(),
                &format!("project/{}", job.project()),
                Action::ModelGenerate,
                json!({"tenant": tenant, "model": model}),
                now_ms(),
            )
            .await;
        match verdict.map(|v| v.decision) {
            Ok(Decision::Allow) => {}
            Ok(Decision::Deny { reasons } | Decision::Escalate { reasons }) => {
                return failed(
                    format!("the model call was not allowed: {}", reasons.join("; ")),
                    false,
                );
            }
            Err(e) => return failed(format!("the constitution could not decide: {e}"), true),
        }
        let system = job
            .spec
            .system_prompt
            .clone()
            .unwrap_or_else(|| format!("You work on a project. Its goal: {}", job.goal));
        let params = SamplingParams {
            max_tokens: job.spec.max_tokens.unwrap_or(256) as usize,
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let messages = vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", prompt),
        ];
        let text = match self
            .complete(
                &pool,
                tenant,
                &job.user,
                &model,
                messages,
                params,
                None,
                Some(cancel),
            )
            .await
        {
            Ok(Some(text)) => text,
            Ok(None) => return RunOutcome::Cancelled,
            Err(e) => return failed(format!("the model: {e}"), true),
        };
        RunOutcome::Done {
            output: Value::String(text.trim().to_string()).to_string(),
        }
    }

    /// One generation on `pool` for `user` of `tenant`, its tokens metered; `None` if
    /// `cancel` is set first. (The constitution's `model.generate` is the caller's.)
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn complete(
        &self,
        pool: &GeneratorPool,
        tenant: &str,
        user: &str,
        model: &str,
        messages: Vec<ChatMessage>,
        params: SamplingParams,
        schema: Option<Value>,
        cancel: Option<&mut watch::Receiver<bool>>,
    ) -> crate::error::Result<Option<String>> {
        let mut stream = pool
            .generate(GenerateRequest {
                prompt: Prompt::Chat(messages),
                params,
                schema,
                tenant: Some(tenant.to_string()),
            })
            .await?;
        // Without a switch, one that is never set (its sender kept: a dropped sender ends
        // the wait at once).
        let (_never_set, mut never) = watch::channel(false);
        let cancel = cancel.unwrap_or(&mut never);
        let completion = loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = cancel.wait_for(|c| *c) => return Ok(None),
            };
            match event {
                Some(Ok(GenerationEvent::Done(c))) => break c,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(Error::Invalid(
                        "the generation ended without a result".into(),
                    ));
                }
            }
        };
        if let Err(e) = self
            .deps
            .tenants
            .record_usage_of(
                tenant,
                model,
                Some(user),
                None,
                completion.usage.prompt_tokens as u64,
                completion.usage.completion_tokens as u64,
                now_ms(),
            )
            .await
        {
            tracing::warn!(tenant, error = %e, "cannot meter a model call");
        }
        Ok(Some(completion.text))
    }
}
