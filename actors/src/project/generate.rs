//! Plans made by a model: the generator writes a plan under a JSON schema (schema-constrained
//! decoding, so the output always parses), then the plan is validated like any other.
//!
//! Two passes, each under a schema the constrained decoder can follow: first the tasks (`id`,
//! `kind` — `agent` or `approval` —, `prompt`); then, for each task after the first, its
//! dependencies, each an `enum` of the ids of the tasks before it, so the dependencies the
//! model can write always name a known, earlier task. Ids are normalised between the passes
//! (lowercased, anything outside `a-z 0-9 - _` becomes `-`, a repeated id gets a `-2`, `-3`
//! suffix). The plan is then validated like a written one.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;
use soma_inference::{ChatMessage, SamplingParams};

use super::Projects;
use super::plan::{Plan, TaskKind, TaskRetry, TaskSpec};
use crate::constitution::{Action, Decision, Principal, PrincipalKind};
use crate::error::{Error, Result};
use crate::tenant::check_id;
use crate::toolcall::now_ms;

/// Tasks of a generated plan, at most.
pub const MAX_GENERATED_TASKS: usize = 12;

/// What to generate a plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// The goal.
    pub goal: String,
    /// The generator model (default: the projects' default model).
    pub model: Option<String>,
    /// Tasks at most (1-12).
    pub max_tasks: usize,
    /// `max_tokens` of each generated agent task.
    pub task_max_tokens: u32,
}

#[derive(Deserialize)]
struct Generated {
    tasks: Vec<GeneratedTask>,
}

#[derive(Deserialize)]
struct GeneratedTask {
    id: String,
    kind: String,
    prompt: String,
}

fn normalise(id: &str) -> String {
    id.trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

fn schema(max_tasks: usize) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_tasks,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "minLength": 1, "maxLength": 24},
                        "kind": {"enum": ["agent", "approval"]},
                        "prompt": {"type": "string", "minLength": 1, "maxLength": 200}
                    },
                    "required": ["id", "kind", "prompt"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["tasks"],
        "additionalProperties": false
    })
}

const SYSTEM: &str = "You plan projects. Break the goal into a few short tasks, in the order they \
are done. Each task has an id (one lowercase word), a kind (\"agent\" for work a model does, \
\"approval\" for a human check) and a prompt saying what to do. Answer with JSON only, for \
example: {\"tasks\": [{\"id\": \"research\", \"kind\": \"agent\", \"prompt\": \"List facts about the \
topic.\"}, {\"id\": \"draft\", \"kind\": \"agent\", \"prompt\": \"Write a draft from the facts.\"}]}";

const SYSTEM_DEPS: &str = "You plan projects. For each task, list the earlier tasks whose results \
it needs. Answer with JSON only: an object from each task's id to a list of earlier ids.";

/// The schema of the dependencies of `ids` (each task after the first: earlier ids only).
fn deps_schema(ids: &[String]) -> serde_json::Value {
    let mut props = serde_json::Map::new();
    for (i, id) in ids.iter().enumerate().skip(1) {
        props.insert(
            id.clone(),
            json!({"type": "array", "maxItems": 3.min(i), "items": {"enum": ids[..i]}}),
        );
    }
    let required: Vec<&String> = ids.iter().skip(1).collect();
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

impl Projects {
    /// A plan for `req.goal`, written by a model under the plan schema for `user` of
    /// `tenant` (the constitution decides the model call; its usage is metered), validated.
    pub async fn generate_plan(&self, tenant: &str, user: &str, req: PlanRequest) -> Result<Plan> {
        check_id(tenant)?;
        check_id(user)?;
        if !(1..=MAX_GENERATED_TASKS).contains(&req.max_tasks) {
            return Err(Error::Invalid(format!(
                "max_tasks must be 1-{MAX_GENERATED_TASKS}, got {}",
                req.max_tasks
            )));
        }
        if !(1..=4096).contains(&req.task_max_tokens) {
            return Err(Error::Invalid(format!(
                "task_max_tokens must be 1-4096, got {}",
                req.task_max_tokens
            )));
        }
        let shared = &self.shared;
        let model = req
            .model
            .clone()
            .or_else(|| shared.default_model())
            .ok_or_else(|| Error::Invalid("no model is loaded to write a plan".into()))?;
        let pool = shared
            .deps
            .generators
            .get(&model)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("model {model:?} is not loaded")))?;
        let principal = Principal {
            kind: PrincipalKind::User,
            id: user.to_string(),
            roles: Vec::new(),
        };
        let verdict = shared
            .deps
            .tenants
            .decide(
                tenant,
                principal,
                "project/plan",
                Action::ModelGenerate,
                json!({"tenant": tenant, "model": model}),
                now_ms(),
            )
            .await?;
        if let Decision::Deny { reasons } | Decision::Escalate { reasons } = verdict.decision {
            return Err(Error::Invalid(format!(
                "the constitution does not allow the model call: {}",
                reasons.join("; ")
            )));
        }
        let text = shared
            .complete(
                &pool,
                tenant,
                user,
                &model,
                vec![
                    ChatMessage::new("system", SYSTEM),
                    ChatMessage::new("user", format!("Goal: {}", req.goal)),
                ],
                SamplingParams::greedy(120 * req.max_tasks),
                Some(schema(req.max_tasks)),
                None,
            )
            .await?
            .unwrap_or_default();
        let generated: Generated = serde_json::from_str(&text).map_err(|e| Error::InvalidPlan {
            task: None,
            reason: format!(
                "the model's plan is not complete JSON ({e}; it may have run out of tokens): {text}"
            ),
        })?;
        let mut ids: Vec<String> = Vec::new();
        for t in &generated.tasks {
            let base = match normalise(&t.id) {
                id if id.is_empty() => "task".to_string(),
                id => id,
            };
            let mut id = base.clone();
            let mut n = 1;
            while ids.contains(&id) {
                n += 1;
                id = format!("{}-{n}", &base[..base.len().min(60)]);
            }
            ids.push(id);
        }
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if ids.len() > 1 {
            let listing: String = ids
                .iter()
                .zip(&generated.tasks)
                .map(|(id, t)| format!("- {id}: {}\n", t.prompt))
                .collect();
            let text = shared
                .complete(
                    &pool,
                    tenant,
                    user,
                    &model,
                    vec![
                        ChatMessage::new("system", SYSTEM_DEPS),
                        ChatMessage::new(
                            "user",
                            format!("Goal: {}\nTasks, in order:\n{listing}", req.goal),
                        ),
                    ],
                    SamplingParams::greedy(40 * ids.len()),
                    Some(deps_schema(&ids)),
                    None,
                )
                .await?
                .unwrap_or_default();
            deps = serde_json::from_str(&text).map_err(|e| Error::InvalidPlan {
                task: None,
                reason: format!("the model's dependencies are not complete JSON ({e}): {text}"),
            })?;
        }
        let tasks = generated
            .tasks
            .into_iter()
            .zip(&ids)
            .map(|(t, id)| TaskSpec {
                id: id.clone(),
                kind: if t.kind == "approval" {
                    TaskKind::Approval
                } else {
                    TaskKind::Agent
                },
                max_tokens: (t.kind != "approval").then_some(req.task_max_tokens),
                prompt: Some(t.prompt),
                model: None,
                system_prompt: None,
                tool: None,
                arguments: None,
                depends_on: {
                    let mut d = deps.remove(id).unwrap_or_default();
                    d.sort();
                    d.dedup();
                    d
                },
                retry: TaskRetry::default(),
                timeout_ms: None,
                approval: false,
                compensation: None,
            })
            .collect();
        let plan = Plan {
            tasks,
            max_parallel: None,
        };
        let checked = plan.check(shared.deps.tool_calls.tools())?;
        Ok(checked.plan)
    }
}
