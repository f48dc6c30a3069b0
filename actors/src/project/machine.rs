//! The one owner of a project's life: its durable state and every transition of it. Each
//! transition changes the state and returns what the actor must do (run a task, cancel one,
//! set a timer, run a compensation); the actor carries that out and never changes the state
//! itself.
//!
//! Waves: a task is ready when all its dependencies are done; ready tasks start in plan order
//! while fewer than the project's `max_parallel` run. Approval gates (a task marked for
//! approval, an `approval` task, a start or a tool call the constitution escalated) wait
//! without holding a slot. A task that fails is retried with backoff while its retry policy
//! allows; when one fails for good, nothing new starts, the running ones are cancelled (one
//! that completes anyway counts as done), and then the compensations of the completed tasks
//! run one by one in reverse completion order before the project ends failed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::plan::{Checked, TaskKind};

/// Events a project keeps (older ones are dropped; subscribers resume within these).
pub const MAX_PROJECT_EVENTS: usize = 512;

/// Where one task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Some dependency is not done.
    Waiting,
    /// Its dependencies are done; it starts when a slot is free.
    Ready,
    /// Waits for a human decision.
    Gated,
    /// It runs (attempt `attempts`).
    Running,
    /// A run failed; it runs again after a backoff.
    Retrying,
    /// It succeeded.
    Done,
    /// It failed for good (or was rejected).
    Failed,
    /// It was stopped (the project was killed or failed) before it ended.
    Cancelled,
}

/// One task's durable slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slot {
    /// Where it stands.
    pub(crate) phase: Phase,
    /// Runs started so far.
    pub(crate) attempts: u32,
}

/// What a gated task waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// The plan marks the task for approval, or the constitution escalated its start.
    Start {
        /// Why.
        reasons: Vec<String>,
    },
    /// An `approval` task.
    Task,
    /// Its tool call was escalated by the constitution (call id in the tenant).
    ToolCall {
        /// The tool call's id.
        call: String,
        /// Why.
        reasons: Vec<String>,
    },
}

/// A human's decision on a gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    /// Approved or rejected.
    pub approved: bool,
    /// Who decided.
    pub by: String,
    /// Their comment.
    pub comment: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Where the project stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectStatus {
    /// Tasks run.
    Running,
    /// A task failed for good: running tasks are being cancelled, then compensations run.
    Failing {
        /// The task that failed.
        task: String,
        /// Why.
        error: String,
    },
    /// Every task is done.
    Succeeded,
    /// A task failed for good; compensations have run.
    Failed {
        /// The task that failed.
        task: String,
        /// Why.
        error: String,
    },
    /// Killed by a person; nothing more runs.
    Killed {
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
}

impl ProjectStatus {
    /// `running`, `failing`, `succeeded`, `failed` or `killed`.
    pub fn name(&self) -> &'static str {
        match self {
            ProjectStatus::Running => "running",
            ProjectStatus::Failing { .. } => "failing",
            ProjectStatus::Succeeded => "succeeded",
            ProjectStatus::Failed { .. } => "failed",
            ProjectStatus::Killed { .. } => "killed",
        }
    }

    /// Whether nothing more happens.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ProjectStatus::Succeeded | ProjectStatus::Failed { .. } | ProjectStatus::Killed { .. }
        )
    }
}

/// What happened, as subscribers and the audit stream see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The project started with this many tasks.
    Started {
        /// Tasks in the plan.
        tasks: u32,
    },
    /// A task started a run.
    TaskStarted {
        /// The task.
        task: String,
        /// Which run (1 for the first).
        attempt: u32,
    },
    /// A task waits for a human decision.
    TaskAwaiting {
        /// The task.
        task: String,
        /// What it waits for.
        gate: Gate,
    },
    /// A human decided a gate.
    TaskDecided {
        /// The task.
        task: String,
        /// The decision.
        decided: Decided,
    },
    /// A task succeeded.
    TaskDone {
        /// The task.
        task: String,
    },
    /// A run of a task failed.
    TaskFailed {
        /// The task.
        task: String,
        /// Which run.
        attempt: u32,
        /// Why.
        error: String,
        /// When it runs again, if it does.
        retry_in_ms: Option<u64>,
    },
    /// A task was stopped before it ended.
    TaskCancelled {
        /// The task.
        task: String,
    },
    /// The compensation of a completed task starts.
    CompensationStarted {
        /// The task it undoes.
        task: String,
    },
    /// The compensation of a task ended.
    CompensationEnded {
        /// The task it undid.
        task: String,
        /// Its error, if it failed (the next compensations run anyway).
        error: Option<String>,
    },
    /// Every task is done.
    Succeeded,
    /// The project failed.
    Failed {
        /// The task that failed.
        task: String,
        /// Why.
        error: String,
    },
    /// The project was killed.
    Killed {
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
}

impl EventKind {
    /// Its name (`task_started`, ...), as the audit stream's action `project.<name>`.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Started { .. } => "started",
            EventKind::TaskStarted { .. } => "task_started",
            EventKind::TaskAwaiting { .. } => "task_awaiting",
            EventKind::TaskDecided { .. } => "task_decided",
            EventKind::TaskDone { .. } => "task_done",
            EventKind::TaskFailed { .. } => "task_failed",
            EventKind::TaskCancelled { .. } => "task_cancelled",
            EventKind::CompensationStarted { .. } => "compensation_started",
            EventKind::CompensationEnded { .. } => "compensation_ended",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed { .. } => "failed",
            EventKind::Killed { .. } => "killed",
        }
    }
}

/// One event, numbered within its project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectEvent {
    /// 1, 2, 3, ... within the project.
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What.
    pub kind: EventKind,
}

/// How a run of a task ended, as its runner reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunOutcome {
    /// It succeeded with this output (JSON text).
    Done {
        /// The output.
        output: String,
    },
    /// It failed.
    Failed {
        /// Why.
        error: String,
        /// Whether another run may succeed.
        retryable: bool,
    },
    /// It waits for a human: the constitution escalated its start or its tool call.
    Gated {
        /// What it waits for.
        gate: Gate,
    },
    /// It was cancelled before it ended.
    Cancelled,
}

/// A project's durable state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProjectState {
    pub(crate) exists: bool,
    pub(crate) goal: String,
    pub(crate) user: String,
    pub(crate) status: Option<ProjectStatus>,
    pub(crate) max_parallel: u32,
    pub(crate) tasks: Vec<Slot>,
    pub(crate) ready: BTreeSet<u32>,
    /// Gated tasks approved to go on from where they stopped (same attempt).
    pub(crate) resume: BTreeSet<u32>,
    pub(crate) running: BTreeMap<u32, u32>,
    pub(crate) gates: BTreeMap<u32, Gate>,
    pub(crate) decisions: BTreeMap<u32, Decided>,
    pub(crate) outputs: BTreeMap<u32, String>,
    pub(crate) errors: BTreeMap<u32, String>,
    /// Completed tasks with a compensation, in completion order.
    pub(crate) undo: Vec<u32>,
    pub(crate) undoing: Option<u32>,
    pub(crate) done: u32,
    pub(crate) events: VecDeque<ProjectEvent>,
    pub(crate) next_event: u64,
    pub(crate) created_ms: u64,
    pub(crate) ended_ms: Option<u64>,
}

/// What the actor must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Start a runner for `attempt` of `task`.
    Run {
        /// The task.
        task: u32,
        /// The attempt.
        attempt: u32,
        /// It goes on after a human approved its escalated tool call.
        resumed: bool,
    },
    /// Cancel the runner of `task` (it reports how it ended).
    Cancel {
        /// The task.
        task: u32,
    },
    /// Run the compensation of `task`.
    Compensate {
        /// The task.
        task: u32,
    },
    /// Reject the escalated tool call `call` (its task was rejected).
    RejectCall {
        /// The call id.
        call: String,
        /// Who decided.
        by: String,
        /// Why.
        comment: String,
    },
    /// Wake the project for a retry of `task` after `after_ms`.
    RetryAfter {
        /// The task.
        task: u32,
        /// The wait.
        after_ms: u64,
    },
    /// Wake the project to time out `attempt` of `task` after `after_ms`.
    TimeoutAfter {
        /// The task.
        task: u32,
        /// The attempt.
        attempt: u32,
        /// The wait.
        after_ms: u64,
    },
}

/// A refused request (the state is unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The project has ended.
    Ended,
    /// The task does not wait for a decision.
    NotAwaiting,
}

/// The transitions of one project, over its state and its checked plan.
pub(crate) struct Machine<'a> {
    pub(crate) s: &'a mut ProjectState,
    pub(crate) plan: &'a Checked,
    pub(crate) now_ms: u64,
    /// Every event this machine emitted (the state keeps only the last ones).
    pub(crate) emitted: Vec<ProjectEvent>,
}

impl Machine<'_> {
    fn id(&self, task: u32) -> String {
        self.plan.plan.tasks[task as usize].id.clone()
    }

    fn emit(&mut self, kind: EventKind) {
        self.s.next_event += 1;
        let event = ProjectEvent {
            seq: self.s.next_event,
            at_ms: self.now_ms,
            kind,
        };
        self.emitted.push(event.clone());
        self.s.events.push_back(event);
        while self.s.events.len() > MAX_PROJECT_EVENTS {
            self.s.events.pop_front();
        }
    }

    fn running_status(&self) -> bool {
        self.s.status == Some(ProjectStatus::Running)
    }

    /// Starts a new project.
    pub(crate) fn start(&mut self, goal: String, user: String) -> Vec<Effect> {
        let n = self.plan.plan.tasks.len();
        *self.s = ProjectState {
            exists: true,
            goal,
            user,
            status: Some(ProjectStatus::Running),
            max_parallel: self.plan.max_parallel,
            tasks: vec![
                Slot {
                    phase: Phase::Waiting,
                    attempts: 0,
                };
                n
            ],
            created_ms: self.now_ms,
            ..ProjectState::default()
        };
        self.emit(EventKind::Started { tasks: n as u32 });
        for i in 0..n {
            if self.plan.deps[i].is_empty() {
                self.s.tasks[i].phase = Phase::Ready;
                self.s.ready.insert(i as u32);
            }
        }
        self.fill()
    }

    /// Starts ready tasks while slots are free.
    fn fill(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        while self.running_status() && (self.s.running.len() as u32) < self.s.max_parallel {
            let Some(task) = self.s.ready.pop_first() else {
                break;
            };
            let spec = &self.plan.plan.tasks[task as usize];
            let resumed = self.s.resume.remove(&task);
            if !resumed && spec.kind == TaskKind::Approval {
                self.gate(task, Gate::Task);
                continue;
            }
            if !resumed && spec.approval && !self.s.decisions.contains_key(&task) {
                self.gate(
                    task,
                    Gate::Start {
                        reasons: vec!["the plan asks for an approval before this task".into()],
                    },
                );
                continue;
            }
            let timeout = spec.timeout_ms;
            let slot = &mut self.s.tasks[task as usize];
            if !resumed {
                slot.attempts += 1;
            }
            slot.phase = Phase::Running;
            let attempt = slot.attempts;
            self.s.running.insert(task, attempt);
            if !resumed {
                let id = self.id(task);
                self.emit(EventKind::TaskStarted { task: id, attempt });
            }
            effects.push(Effect::Run {
                task,
                attempt,
                resumed,
            });
            // A resumed run keeps the deadline its attempt was given when it started.
            if let Some(after_ms) = timeout.filter(|_| !resumed) {
                effects.push(Effect::TimeoutAfter {
                    task,
                    attempt,
                    after_ms,
                });
            }
        }
        effects
    }

    fn gate(&mut self, task: u32, gate: Gate) {
        self.s.tasks[task as usize].phase = Phase::Gated;
        self.s.gates.insert(task, gate.clone());
        let id = self.id(task);
        self.emit(EventKind::TaskAwaiting { task: id, gate });
    }

    /// A runner reports how `attempt` of `task` ended.
    pub(crate) fn ran(&mut self, task: u32, attempt: u32, outcome: RunOutcome) -> Vec<Effect> {
        if task as usize >= self.s.tasks.len() || self.s.running.get(&task) != Some(&attempt) {
            // A late report of a run that timed out, was cancelled or is not this one.
            return Vec::new();
        }
        self.s.running.remove(&task);
        let failing = matches!(self.s.status, Some(ProjectStatus::Failing { .. }));
        let mut effects = Vec::new();
        match outcome {
            RunOutcome::Done { output } => self.done(task, output),
            RunOutcome::Cancelled => self.cancelled(task),
            RunOutcome::Gated {
                gate: Gate::ToolCall { call, .. },
            } if failing || !self.running_status() => {
                effects.push(Effect::RejectCall {
                    call,
                    by: "project".into(),
                    comment: "the project no longer runs".into(),
                });
                self.cancelled(task);
            }
            RunOutcome::Gated { .. } if failing || !self.running_status() => self.cancelled(task),
            RunOutcome::Gated { gate } => self.gate(task, gate),
            RunOutcome::Failed { error, .. } if failing => {
                self.s.errors.insert(task, error);
                self.cancelled(task);
            }
            RunOutcome::Failed { error, retryable } => {
                effects.extend(self.failed_run(task, attempt, error, retryable));
            }
        }
        effects.extend(self.settle());
        effects
    }

    fn done(&mut self, task: u32, output: String) {
        self.s.tasks[task as usize].phase = Phase::Done;
        self.s.done += 1;
        self.s.outputs.insert(task, output);
        self.s.gates.remove(&task);
        if self.plan.plan.tasks[task as usize].compensation.is_some() {
            self.s.undo.push(task);
        }
        let id = self.id(task);
        self.emit(EventKind::TaskDone { task: id });
        for &d in &self.plan.dependents[task as usize] {
            let ready = self.plan.deps[d as usize]
                .iter()
                .all(|&p| self.s.tasks[p as usize].phase == Phase::Done);
            if ready && self.s.tasks[d as usize].phase == Phase::Waiting {
                self.s.tasks[d as usize].phase = Phase::Ready;
                self.s.ready.insert(d);
            }
        }
    }

    fn cancelled(&mut self, task: u32) {
        self.s.tasks[task as usize].phase = Phase::Cancelled;
        self.s.gates.remove(&task);
        let id = self.id(task);
        self.emit(EventKind::TaskCancelled { task: id });
    }

    fn failed_run(
        &mut self,
        task: u32,
        attempt: u32,
        error: String,
        retryable: bool,
    ) -> Vec<Effect> {
        let retry = self.plan.plan.tasks[task as usize].retry;
        let again = retryable && attempt < retry.max_attempts;
        let after_ms = again.then(|| {
            retry
                .backoff_ms
                .saturating_mul(1u64 << (attempt - 1).min(20))
        });
        self.s.errors.insert(task, error.clone());
        let id = self.id(task);
        self.emit(EventKind::TaskFailed {
            task: id.clone(),
            attempt,
            error: error.clone(),
            retry_in_ms: after_ms,
        });
        match after_ms {
            Some(after_ms) => {
                self.s.tasks[task as usize].phase = Phase::Retrying;
                vec![Effect::RetryAfter { task, after_ms }]
            }
            None => {
                self.s.tasks[task as usize].phase = Phase::Failed;
                self.fail(id, error)
            }
        }
    }

    /// Tasks that never started (waiting, ready, between retries) will not: cancelled (one
    /// event for the project's end covers them).
    fn cancel_unstarted(&mut self) {
        for t in &mut self.s.tasks {
            if matches!(t.phase, Phase::Waiting | Phase::Ready | Phase::Retrying) {
                t.phase = Phase::Cancelled;
            }
        }
    }

    /// Cancels every gated task; an escalated tool call among them is rejected, so that it
    /// cannot be approved and run on its own later.
    fn cancel_gates(&mut self, why: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        for (t, gate) in std::mem::take(&mut self.s.gates) {
            if let Gate::ToolCall { call, .. } = gate {
                effects.push(Effect::RejectCall {
                    call,
                    by: "project".into(),
                    comment: why.to_string(),
                });
            }
            self.cancelled(t);
        }
        effects
    }

    /// The project fails because of `task`: nothing new starts; running tasks are cancelled.
    fn fail(&mut self, task: String, error: String) -> Vec<Effect> {
        let why = format!("the project failed at {task}");
        self.s.status = Some(ProjectStatus::Failing { task, error });
        self.s.ready.clear();
        self.cancel_unstarted();
        self.s.resume.clear();
        let mut effects = self.cancel_gates(&why);
        effects.extend(self.s.running.keys().map(|&task| Effect::Cancel { task }));
        effects
    }

    /// Moves the project on once nothing runs: success, or the next compensation.
    fn settle(&mut self) -> Vec<Effect> {
        match &self.s.status {
            Some(ProjectStatus::Running) => {
                if self.s.done as usize == self.s.tasks.len() {
                    self.s.status = Some(ProjectStatus::Succeeded);
                    self.s.ended_ms = Some(self.now_ms);
                    self.emit(EventKind::Succeeded);
                    Vec::new()
                } else {
                    self.fill()
                }
            }
            Some(ProjectStatus::Failing { .. })
                if self.s.running.is_empty() && self.s.undoing.is_none() =>
            {
                self.compensate_next()
            }
            _ => Vec::new(),
        }
    }

    fn compensate_next(&mut self) -> Vec<Effect> {
        if let Some(task) = self.s.undo.pop() {
            self.s.undoing = Some(task);
            let id = self.id(task);
            self.emit(EventKind::CompensationStarted { task: id });
            return vec![Effect::Compensate { task }];
        }
        if let Some(ProjectStatus::Failing { task, error }) = self.s.status.take() {
            self.s.status = Some(ProjectStatus::Failed {
                task: task.clone(),
                error: error.clone(),
            });
            self.s.ended_ms = Some(self.now_ms);
            self.emit(EventKind::Failed { task, error });
        }
        Vec::new()
    }

    /// The compensation of `task` ended.
    pub(crate) fn compensated(&mut self, task: u32, error: Option<String>) -> Vec<Effect> {
        if self.s.undoing != Some(task) {
            return Vec::new();
        }
        self.s.undoing = None;
        let id = self.id(task);
        self.emit(EventKind::CompensationEnded { task: id, error });
        self.compensate_next()
    }

    /// A retry's backoff of `task` ended.
    pub(crate) fn retry_due(&mut self, task: u32) -> Vec<Effect> {
        if !self.running_status()
            || self.s.tasks.get(task as usize).map(|t| t.phase) != Some(Phase::Retrying)
        {
            return Vec::new();
        }
        self.s.tasks[task as usize].phase = Phase::Ready;
        self.s.ready.insert(task);
        self.fill()
    }

    /// `attempt` of `task` ran out of time: it is cancelled and counts as a failed run.
    pub(crate) fn timed_out(&mut self, task: u32, attempt: u32) -> Vec<Effect> {
        if self.s.running.get(&task) != Some(&attempt) {
            return Vec::new();
        }
        let after = self.plan.plan.tasks[task as usize].timeout_ms.unwrap_or(0);
        let mut effects = vec![Effect::Cancel { task }];
        effects.extend(self.ran(
            task,
            attempt,
            RunOutcome::Failed {
                error: format!("run {attempt} took longer than {after} ms"),
                retryable: true,
            },
        ));
        effects
    }

    /// A human decides the gate of `task`.
    pub(crate) fn decide(&mut self, task: u32, decided: Decided) -> Result<Vec<Effect>, Refusal> {
        if !self.running_status() {
            return Err(Refusal::Ended);
        }
        let Some(gate) = self.s.gates.remove(&task) else {
            return Err(Refusal::NotAwaiting);
        };
        let id = self.id(task);
        self.emit(EventKind::TaskDecided {
            task: id.clone(),
            decided: decided.clone(),
        });
        let approved = decided.approved;
        let comment = format!("rejected by {}: {}", decided.by, decided.comment);
        let output = serde_json::json!({
            "approved": approved, "by": decided.by, "comment": decided.comment,
        })
        .to_string();
        self.s.decisions.insert(task, decided);
        let mut effects = Vec::new();
        if let (false, Gate::ToolCall { call, .. }) = (approved, &gate) {
            let d = &self.s.decisions[&task];
            effects.push(Effect::RejectCall {
                call: call.clone(),
                by: d.by.clone(),
                comment: d.comment.clone(),
            });
        }
        if !approved {
            self.s.tasks[task as usize].phase = Phase::Failed;
            self.s.errors.insert(task, comment.clone());
            effects.extend(self.fail(id, comment));
        } else {
            match gate {
                Gate::Task => self.done(task, output),
                Gate::Start { .. } => {
                    self.s.tasks[task as usize].phase = Phase::Ready;
                    self.s.ready.insert(task);
                }
                Gate::ToolCall { .. } => {
                    self.s.tasks[task as usize].phase = Phase::Ready;
                    self.s.ready.insert(task);
                    self.s.resume.insert(task);
                }
            }
        }
        effects.extend(self.settle());
        Ok(effects)
    }

    /// A person kills the project: running tasks are cancelled, nothing else starts.
    pub(crate) fn kill(&mut self, by: String, reason: String) -> Result<Vec<Effect>, Refusal> {
        if self.s.status.as_ref().is_none_or(ProjectStatus::is_final) {
            return Err(Refusal::Ended);
        }
        let mut effects: Vec<Effect> = self
            .s
            .running
            .keys()
            .map(|&task| Effect::Cancel { task })
            .collect();
        for (task, _) in std::mem::take(&mut self.s.running) {
            self.cancelled(task);
        }
        effects.extend(self.cancel_gates(&format!("the project was killed by {by}: {reason}")));
        self.s.ready.clear();
        self.cancel_unstarted();
        self.s.resume.clear();
        self.s.undoing = None;
        self.s.status = Some(ProjectStatus::Killed {
            by: by.clone(),
            reason: reason.clone(),
        });
        self.s.ended_ms = Some(self.now_ms);
        self.emit(EventKind::Killed { by, reason });
        Ok(effects)
    }

    /// After a restart: the runs and the compensation the state says are under way (runs
    /// that were being cancelled are cancelled again).
    pub(crate) fn resume(&self) -> Vec<Effect> {
        let failing = matches!(self.s.status, Some(ProjectStatus::Failing { .. }));
        let mut effects = Vec::new();
        for (&task, &attempt) in &self.s.running {
            effects.push(Effect::Run {
                task,
                attempt,
                resumed: false,
            });
            if failing {
                effects.push(Effect::Cancel { task });
            }
        }
        if let Some(task) = self.s.undoing {
            effects.push(Effect::Compensate { task });
        }
        effects
    }
}

/// The outputs of the tasks `names` as JSON values, by task id (for a run's references).
pub(crate) fn outputs_of(
    s: &ProjectState,
    plan: &Checked,
    names: &BTreeSet<String>,
) -> BTreeMap<String, Value> {
    plan.plan
        .tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| names.contains(&t.id))
        .filter_map(|(i, t)| {
            let text = s.outputs.get(&(i as u32))?;
            let v = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()));
            Some((t.id.clone(), v))
        })
        .collect()
}
