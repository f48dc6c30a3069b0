//! KAMACHIQ plans: a task DAG in JSON, validated before anything runs.
//!
//! A task is an `agent` (a prompt for a model), a `tool` (a tool and its arguments) or an
//! `approval` (a human decides). Prompts and string arguments may reference the outputs of
//! tasks the task depends on, directly or through others: `{{tasks.<id>.output}}`, or a field
//! of it, `{{tasks.<id>.output.<field>.<field>}}`; `{{goal}}` is the project's goal. A string
//! argument that is exactly one reference becomes the referenced JSON value; anywhere else the
//! reference is replaced by its text. The JSON Schema of plans is `docs/plan.schema.json`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tenant::check_id;
use crate::tools::ToolRegistry;

/// Tasks per project, at most.
pub const MAX_TASKS: usize = 10_000;
/// Dependencies of one task, at most.
pub const MAX_DEPENDENCIES: usize = 256;
/// Bytes of one task's prompt or arguments (as JSON text), at most.
pub const MAX_TASK_TEXT: usize = 64 * 1024;
/// Tasks of one project running at once, at most (the plan may ask for fewer).
pub const MAX_PARALLEL: u32 = 256;
/// Runs of one task, at most, the first included.
pub const MAX_ATTEMPTS: u32 = 10;

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A model answers `prompt`.
    Agent,
    /// `tool` runs with `arguments`.
    Tool,
    /// A human approves or rejects; its output is the decision.
    Approval,
}

/// How a failed task is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRetry {
    /// Runs at most, the first included (1-10).
    pub max_attempts: u32,
    /// The wait before the second run, doubled before each next one.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    500
}

impl Default for TaskRetry {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff_ms: default_backoff_ms(),
        }
    }
}

/// What undoes a completed task when a later one fails for good: a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compensation {
    /// The tool.
    pub tool: String,
    /// Its arguments (references as in the task's own).
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// One task of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique within the plan: 1-64 of `a-z 0-9 - _`.
    pub id: String,
    /// What it does.
    pub kind: TaskKind,
    /// `agent`: what the model is asked; `approval`: what the human is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// `agent`: the generator model (default: the projects' default model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `agent`: its system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// `agent`: tokens generated at most (1-4096, default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// `tool`: the tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// `tool`: its arguments, an object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// Tasks that must be done before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Retries of a failed run.
    #[serde(default)]
    pub retry: TaskRetry,
    /// A run taking longer fails (and may be retried); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Waits for a human approval before it starts.
    #[serde(default)]
    pub approval: bool,
    /// What undoes it if a later task fails for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Compensation>,
}

/// A task DAG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The tasks, in any order.
    pub tasks: Vec<TaskSpec>,
    /// Tasks of this project running at once (1-256, default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
}

/// A plan that passed validation, with its dependencies as indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The plan.
    pub plan: Plan,
    /// Per task, the indexes of its dependencies.
    pub deps: Vec<Vec<u32>>,
    /// Per task, the indexes of the tasks that depend on it.
    pub dependents: Vec<Vec<u32>>,
    /// Tasks of the project running at once.
    pub max_parallel: u32,
}

fn invalid(task: Option<&str>, reason: impl Into<String>) -> Error {
    Error::InvalidPlan {
        task: task.map(str::to_string),
        reason: reason.into(),
    }
}

/// A reference found in a text: the task and the field path into its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reference<'a> {
    /// `{{goal}}`.
    Goal,
    /// `{{tasks.<id>.output(.<field>)*}}`.
    Output { task: &'a str, path: Vec<&'a str> },
}

/// The references in `text`, with their byte ranges (of the whole `{{...}}`).
pub(crate) fn references(
    text: &str,
) -> Result<Vec<(std::ops::Range<usize>, Reference<'_>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = text[at..].find("{{") {
        let start = at + open;
        let Some(close) = text[start + 2..].find("}}") else {
            return Err(format!("an unclosed '{{{{' at byte {start}"));
        };
        let end = start + 2 + close + 2;
        let inner = text[start + 2..end - 2].trim();
        let r = if inner == "goal" {
            Reference::Goal
        } else {
            let mut parts = inner.split('.');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("tasks"), Some(task), Some("output")) if !task.is_empty() => {
                    let path: Vec<&str> = parts.collect();
                    if path.iter().any(|p| p.is_empty()) {
                        return Err(format!("an empty field in {{{{{inner}}}}}"));
                    }
                    Reference::Output { task, path }
                }
                _ => {
                    return Err(format!(
                        "{{{{{inner}}}}} is not a reference (use {{{{goal}}}} or {{{{tasks.<id>.output}}}})"
                    ));
                }
            }
        };
        out.push((start..end, r));
        at = end;
    }
    Ok(out)
}

/// Every string in `v` (keys are not searched).
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

impl TaskSpec {
    /// The texts that may hold references, each with whether it may reference the task's
    /// own output (a compensation undoes what its task made).
    fn texts(&self) -> Vec<(&str, bool)> {
        let mut out = Vec::new();
        if let Some(p) = &self.prompt {
            out.push((p.as_str(), false));
        }
        let mut own = Vec::new();
        if let Some(a) = &self.arguments {
            strings(a, &mut own);
        }
        out.extend(own.into_iter().map(|t| (t, false)));
        let mut undo = Vec::new();
        if let Some(c) = &self.compensation {
            strings(&c.arguments, &mut undo);
        }
        out.extend(undo.into_iter().map(|t| (t, true)));
        out
    }

    fn check_shape(&self, tools: Option<&ToolRegistry>) -> Result<()> {
        let id = Some(self.id.as_str());
        let no = |field: &str, present: bool| {
            if present {
                Err(invalid(
                    id,
                    format!("a {} task has no {field}", kind_name(self.kind)),
                ))
            } else {
                Ok(())
            }
        };
        match self.kind {
            TaskKind::Agent => {
                match &self.prompt {
                    None => return Err(invalid(id, "an agent task needs a prompt")),
                    Some(p) if p.trim().is_empty() => {
                        return Err(invalid(id, "the prompt is empty"));
                    }
                    Some(_) => {}
                }
                no("tool", self.tool.is_some())?;
                no("arguments", self.arguments.is_some())?;
                if let Some(n) = self.max_tokens
                    && !(1..=4096).contains(&n)
                {
                    return Err(invalid(id, format!("max_tokens must be 1-4096, got {n}")));
                }
            }
            TaskKind::Tool => {
                let Some(tool) = &self.tool else {
                    return Err(invalid(id, "a tool task needs a tool"));
                };
                check_tool(id, tool, tools)?;
                if let Some(a) = &self.arguments
                    && !a.is_object()
                {
                    return Err(invalid(id, "arguments must be a JSON object"));
                }
                no("prompt", self.prompt.is_some())?;
                no("model", self.model.is_some())?;
                no("system_prompt", self.system_prompt.is_some())?;
                no("max_tokens", self.max_tokens.is_some())?;
            }
            TaskKind::Approval => {
                no("tool", self.tool.is_some())?;
                no("arguments", self.arguments.is_some())?;
                no("model", self.model.is_some())?;
                no("system_prompt", self.system_prompt.is_some())?;
                no("max_tokens", self.max_tokens.is_some())?;
                no("retry", self.retry != TaskRetry::default())?;
                no("timeout_ms", self.timeout_ms.is_some())?;
            }
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.retry.max_attempts) {
            return Err(invalid(
                id,
                format!(
                    "retry.max_attempts must be 1-{MAX_ATTEMPTS}, got {}",
                    self.retry.max_attempts
                ),
            ));
        }
        if self.retry.backoff_ms > 3_600_000 {
            return Err(invalid(id, "retry.backoff_ms must be at most one hour"));
        }
        if self.timeout_ms == Some(0) {
            return Err(invalid(id, "timeout_ms must be at least 1"));
        }
        if let Some(c) = &self.compensation {
            check_tool(id, &c.tool, tools)?;
            if !c.arguments.is_object() {
                return Err(invalid(id, "compensation.arguments must be a JSON object"));
            }
        }
        let size = self.prompt.as_ref().map_or(0, String::len)
            + self.system_prompt.as_ref().map_or(0, String::len)
            + self.arguments.as_ref().map_or(0, |a| a.to_string().len())
            + self
                .compensation
                .as_ref()
                .map_or(0, |c| c.arguments.to_string().len());
        if size > MAX_TASK_TEXT {
            return Err(invalid(
                id,
                format!("the prompts and arguments are {size} bytes, over {MAX_TASK_TEXT}"),
            ));
        }
        if self.depends_on.len() > MAX_DEPENDENCIES {
            return Err(invalid(
                id,
                format!(
                    "{} dependencies, over {MAX_DEPENDENCIES}",
                    self.depends_on.len()
                ),
            ));
        }
        Ok(())
    }
}

fn check_tool(task: Option<&str>, tool: &str, tools: Option<&ToolRegistry>) -> Result<()> {
    let Some(tools) = tools else {
        return Ok(());
    };
    if tools.get(tool).is_none() {
        return Err(invalid(
            task,
            format!("unknown tool {tool:?} (registered: {:?})", tools.names()),
        ));
    }
    Ok(())
}

fn kind_name(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Agent => "agent",
        TaskKind::Tool => "tool",
        TaskKind::Approval => "approval",
    }
}

impl Plan {
    /// Parses a plan from JSON text; the error names the line and column.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| invalid(None, format!("not a plan: {e}")))
    }

    /// Validates the plan against the registered `tools`: ids, shapes, dependencies (unknown
    /// ones, cycles: the error names one), references (only to tasks it depends on), limits.
    pub fn check(self, tools: &ToolRegistry) -> Result<Checked> {
        self.check_with(Some(tools))
    }

    /// As [`check`](Self::check) without the tools: for a stored plan, whose tools may have
    /// gone since (a run of an unknown tool then fails its task).
    pub fn compile(self) -> Result<Checked> {
        self.check_with(None)
    }

    fn check_with(self, tools: Option<&ToolRegistry>) -> Result<Checked> {
        if self.tasks.is_empty() {
            return Err(invalid(None, "the plan has no tasks"));
        }
        if self.tasks.len() > MAX_TASKS {
            return Err(invalid(
                None,
                format!("{} tasks, over the limit of {MAX_TASKS}", self.tasks.len()),
            ));
        }
        let max_parallel = self.max_parallel.unwrap_or(8);
        if !(1..=MAX_PARALLEL).contains(&max_parallel) {
            return Err(invalid(
                None,
                format!("max_parallel must be 1-{MAX_PARALLEL}, got {max_parallel}"),
            ));
        }
        let mut index: BTreeMap<&str, u32> = BTreeMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            check_id(&t.id).map_err(|_| {
                invalid(
                    Some(&t.id),
                    "a task id is 1-64 of a-z, 0-9, '-', '_'".to_string(),
                )
            })?;
            if index.insert(&t.id, i as u32).is_some() {
                return Err(invalid(Some(&t.id), "the id is used by another task"));
            }
            t.check_shape(tools)?;
        }
        let n = self.tasks.len();
        let mut deps = vec![Vec::new(); n];
        let mut dependents = vec![Vec::new(); n];
        for (i, t) in self.tasks.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for d in &t.depends_on {
                let Some(&j) = index.get(d.as_str()) else {
                    return Err(invalid(
                        Some(&t.id),
                        format!("depends on unknown task {d:?}"),
                    ));
                };
                if j as usize == i {
                    return Err(invalid(Some(&t.id), "depends on itself"));
                }
                if seen.insert(j) {
                    deps[i].push(j);
                    dependents[j as usize].push(i as u32);
                }
            }
        }
        let order = topological(&deps, &dependents).map_err(|cycle| {
            invalid(
                None,
                format!(
                    "the dependencies form a cycle: {}",
                    cycle_text(&self, &cycle)
                ),
            )
        })?;
        let _ = order;
        for (i, t) in self.tasks.iter().enumerate() {
            for (text, own) in t.texts() {
                let refs = references(text).map_err(|e| invalid(Some(&t.id), e))?;
                for (_, r) in refs {
                    let Reference::Output { task, .. } = r else {
                        continue;
                    };
                    match index.get(task) {
                        None => {
                            return Err(invalid(
                                Some(&t.id),
                                format!("references the output of unknown task {task:?}"),
                            ));
                        }
                        Some(&j) if own && j as usize == i => {}
                        Some(&j) if !reaches(&deps, i as u32, j) => {
                            return Err(invalid(
                                Some(&t.id),
                                format!(
                                    "references the output of {task:?}, which it does not depend on"
                                ),
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(Checked {
            plan: self,
            deps,
            dependents,
            max_parallel,
        })
    }
}

/// Whether `to` is among the dependencies of `from`, directly or through others.
fn reaches(deps: &[Vec<u32>], from: u32, to: u32) -> bool {
    if deps[from as usize].contains(&to) {
        return true;
    }
    let mut seen = vec![false; deps.len()];
    let mut stack: Vec<u32> = deps[from as usize].clone();
    while let Some(t) = stack.pop() {
        if t == to {
            return true;
        }
        if std::mem::replace(&mut seen[t as usize], true) {
            continue;
        }
        stack.extend(
            deps[t as usize]
                .iter()
                .copied()
                .filter(|&d| !seen[d as usize]),
        );
    }
    false
}

/// A topological order, or one cycle (task indexes, the first repeated at the end).
fn topological(deps: &[Vec<u32>], dependents: &[Vec<u32>]) -> Result<Vec<u32>, Vec<u32>> {
    let n = deps.len();
    let mut indegree: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut ready: Vec<u32> = (0..n as u32)
        .filter(|&i| indegree[i as usize] == 0)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &d in &dependents[i as usize] {
            indegree[d as usize] -= 1;
            if indegree[d as usize] == 0 {
                ready.push(d);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every task left has a dependency left: walk dependencies until one repeats.
    let Some(start) = (0..n).find(|&i| indegree[i] > 0) else {
        return Err(Vec::new());
    };
    let mut path: Vec<u32> = vec![start as u32];
    let mut at_pos: BTreeMap<u32, usize> = BTreeMap::from([(start as u32, 0)]);
    let mut at = start as u32;
    loop {
        let Some(&next) = deps[at as usize]
            .iter()
            .find(|&&d| indegree[d as usize] > 0)
        else {
            return Err(path);
        };
        if let Some(&p) = at_pos.get(&next) {
            let mut cycle: Vec<u32> = path[p..].to_vec();
            cycle.reverse();
            cycle.push(*cycle.first().unwrap_or(&next));
            return Err(cycle);
        }
        at_pos.insert(next, path.len());
        path.push(next);
        at = next;
    }
}

fn cycle_text(plan: &Plan, cycle: &[u32]) -> String {
    cycle
        .iter()
        .map(|&i| plan.tasks[i as usize].id.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// The value at `path` in `v`.
fn at_path<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, p| match v {
        Value::Object(o) => o.get(*p),
        Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Resolves references with the outputs at hand (`output(id)`), for a run.
pub(crate) struct Resolver<'a> {
    pub(crate) goal: &'a str,
    pub(crate) outputs: &'a BTreeMap<String, Value>,
}

impl Resolver<'_> {
    fn value(&self, r: &Reference<'_>) -> std::result::Result<Value, String> {
        match r {
            Reference::Goal => Ok(Value::String(self.goal.to_string())),
            Reference::Output { task, path } => {
                let out = self
                    .outputs
                    .get(*task)
                    .ok_or_else(|| format!("the output of {task:?} is not available"))?;
                at_path(out, path).cloned().ok_or_else(|| {
                    format!("the output of {task:?} has no field {}", path.join("."))
                })
            }
        }
    }

    /// `text` with its references replaced by their text.
    pub(crate) fn text(&self, text: &str) -> std::result::Result<String, String> {
        let refs = references(text)?;
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (range, r) in refs {
            out.push_str(&text[at..range.start]);
            out.push_str(&as_text(&self.value(&r)?));
            at = range.end;
        }
        out.push_str(&text[at..]);
        Ok(out)
    }

    /// `v` with the references in its strings resolved (a string that is exactly one
    /// reference becomes the referenced value).
    pub(crate) fn json(&self, v: &Value) -> std::result::Result<Value, String> {
        Ok(match v {
            Value::String(s) => {
                let refs = references(s)?;
                match refs.as_slice() {
                    [(range, r)] if range.start == 0 && range.end == s.len() => self.value(r)?,
                    [] => v.clone(),
                    _ => Value::String(self.text(s)?),
                }
            }
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|x| self.json(x))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| Ok((k.clone(), self.json(x)?)))
                    .collect::<std::result::Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
}

/// The tasks whose outputs `spec` references.
pub(crate) fn referenced(spec: &TaskSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (text, _) in spec.texts() {
        if let Ok(refs) = references(text) {
            for (_, r) in refs {
                if let Reference::Output { task, .. } = r {
                    out.insert(task.to_string());
                }
            }
        }
    }
    out
}
