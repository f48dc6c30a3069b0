//! KAMACHIQ projects: a goal and a task DAG ([`Plan`]) run as one durable actor per project
//! (registry `project`, key `tenant/project`), in parallel waves under the tenant's
//! constitution, with approval gates, retries, timeouts, a kill switch and compensation.
//!
//! The project's state machine is [`machine`]; the work of each task run is done by a runner
//! ([`run`]) outside the handler, which reports back as a message, so the project answers
//! approvals and kills while its tasks run. The plan itself is stored once, as JSON, under the
//! same key in registry `project-plan`, and kept compiled in memory.

mod api;
mod capsule;
mod generate;
mod machine;
mod plan;
mod run;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_adapters::{AuditEvent, Outcome};
use soma_inference::GeneratorPool;
use soma_supervision::{Context, DurableActor, HandlerError, Registry, WeakRegistry};
use tokio::sync::{Semaphore, broadcast, watch};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::tenant::Tenants;
use crate::toolcall::{ToolCalls, now_ms, split_key};

pub use api::{ProjectInfo, ProjectSubscription, Projects, TaskInfo};
pub use capsule::{
    Capsule, CapsuleActor, CapsuleMsg, CapsuleParam, CapsuleVersion, MAX_CAPSULE_VERSIONS,
    ParamType,
};
pub use generate::{MAX_GENERATED_TASKS, PlanRequest};
pub use machine::{
    Decided, EventKind as ProjectEventKind, Gate, MAX_PROJECT_EVENTS, Phase, ProjectEvent,
    ProjectState, ProjectStatus, RunOutcome,
};
pub use plan::{
    Checked, Compensation, MAX_ATTEMPTS, MAX_DEPENDENCIES, MAX_PARALLEL, MAX_TASK_TEXT, MAX_TASKS,
    Plan, TaskKind, TaskRetry, TaskSpec,
};

use machine::{Effect, Machine, outputs_of};
use run::Job;

/// Bytes of a goal, at most.
pub const MAX_GOAL: usize = 16 * 1024;
/// Live events a subscriber may fall behind by before it is ended.
pub const PROJECT_LIVE_BUFFER: usize = 1024;

/// The project actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ProjectMsg {
    /// Starts the project (its plan is stored already); once per project.
    Start {
        /// The goal.
        goal: String,
        /// Who started it (the principal of its tasks).
        user: String,
        /// The seq of the plan's message in `project-plan` (sent alongside).
        plan_seq: u64,
        /// The sha256 of the plan's text: a start whose plan is not the one stored (another
        /// start of the same id stored its plan first) starts nothing.
        plan_digest: String,
    },
    /// A runner reports a run.
    Ran {
        /// The task.
        task: u32,
        /// The attempt.
        attempt: u32,
        /// How it ended.
        outcome: RunOutcome,
    },
    /// A compensation ended.
    Compensated {
        /// The task it undid.
        task: u32,
        /// Its error, if it failed.
        error: Option<String>,
    },
    /// A retry's backoff ended (a timer).
    RetryDue {
        /// The task.
        task: u32,
    },
    /// A run's time is up (a timer).
    TimedOut {
        /// The task.
        task: u32,
        /// The attempt.
        attempt: u32,
    },
    /// A human decides a gated task.
    Decide {
        /// The task.
        task: u32,
        /// The decision.
        decided: Decided,
    },
    /// Kills the project.
    Kill {
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
    /// After a restart: restarts the runs the state says are under way.
    Resume,
    /// Forgets the project (its tenant is erased).
    Erase,
}

/// What projects are built from.
pub struct ProjectDeps {
    /// The tenants (constitutions, metering, the audit stream).
    pub tenants: Tenants,
    /// Tool calls (and the tools).
    pub tool_calls: ToolCalls,
    /// Generator pools by model name, for agent tasks.
    pub generators: BTreeMap<String, Arc<GeneratorPool>>,
}

impl std::fmt::Debug for ProjectDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectDeps")
            .field("generators", &self.generators.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Options of the projects of a runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectOptions {
    /// The model of agent tasks that name none (default: the first loaded).
    pub default_model: Option<String>,
    /// Task runs of one tenant at once in this process, over all its projects.
    pub tenant_parallelism: usize,
}

impl Default for ProjectOptions {
    fn default() -> Self {
        Self {
            default_model: None,
            tenant_parallelism: 64,
        }
    }
}

impl ProjectOptions {
    /// Checks every value, naming the option that is wrong.
    pub fn validate(&self) -> Result<()> {
        if !(1..=4096).contains(&self.tenant_parallelism) {
            return Err(Error::Config(format!(
                "projects.tenant_parallelism must be 1-4096, got {}",
                self.tenant_parallelism
            )));
        }
        Ok(())
    }
}

/// What a runner does: a run of a task, or the compensation of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Work {
    Run(u32),
    Undo(u32),
}

struct Inflight {
    cancel: watch::Sender<bool>,
    /// The tool call it makes, if it makes one.
    call: Option<String>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// The events of one handled message, by its seq.
type Unpublished = (u64, Vec<ProjectEvent>);

/// What the project actors and their runners share.
pub(crate) struct Shared {
    deps: ProjectDeps,
    options: ProjectOptions,
    /// Weak: the registry owns the actor, which owns this.
    registry: OnceLock<WeakRegistry<ProjectActor>>,
    plans: Registry<PlanActor>,
    /// Compiled plans by project, with the digest of the text they were compiled from.
    cache: Mutex<HashMap<String, (String, Arc<Checked>)>>,
    inflight: Mutex<HashMap<(String, u32, Work), Inflight>>,
    tenant_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    hub: Mutex<HashMap<String, broadcast::Sender<ProjectEvent>>>,
    /// Per project, events waiting for their message's commit before subscribers see them.
    unpublished: Mutex<HashMap<String, VecDeque<Unpublished>>>,
}

impl Shared {
    fn default_model(&self) -> Option<String> {
        self.options
            .default_model
            .clone()
            .or_else(|| self.deps.generators.keys().next().cloned())
    }

    fn tenant_slots(&self, tenant: &str) -> Arc<Semaphore> {
        let mut map = self.tenant_slots.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.options.tenant_parallelism)))
            .clone()
    }

    /// The plan of project `key`, compiled (`None`: no plan is stored).
    async fn plan(&self, key: &str) -> std::result::Result<Option<Arc<Checked>>, HandlerError> {
        if let Some(p) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(Some(p.1.clone()));
        }
        let Some(text) = self.plans.state(key).await.map_err(HandlerError::new)? else {
            return Ok(None);
        };
        let checked = Plan::from_json(&text)
            .and_then(Plan::compile)
            .map_err(HandlerError::new)?;
        let checked = Arc::new(checked);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), (digest(&text), checked.clone()));
        Ok(Some(checked))
    }

    /// Streams `events` of message `seq` once that message is handled (a subscriber that sees
    /// an event reads a state that has it), in order, by one task per project at a time.
    fn after_commit(self: &Arc<Self>, key: &str, seq: u64, events: Vec<ProjectEvent>) {
        if events.is_empty() {
            return;
        }
        let mut map = self.unpublished.lock().unwrap_or_else(|p| p.into_inner());
        let start = !map.contains_key(key);
        map.entry(key.to_string())
            .or_default()
            .push_back((seq, events));
        if start {
            tokio::spawn(self.clone().drain(key.to_string()));
        }
    }

    async fn drain(self: Arc<Self>, key: String) {
        loop {
            let next = {
                let mut map = self.unpublished.lock().unwrap_or_else(|p| p.into_inner());
                let Some(q) = map.get_mut(&key) else { return };
                match q.pop_front() {
                    Some(n) => n,
                    None => {
                        map.remove(&key);
                        return;
                    }
                }
            };
            let (seq, events) = next;
            let Some(registry) = self.registry.get().and_then(WeakRegistry::upgrade) else {
                return;
            };
            if registry.wait_handled(&key, seq).await.is_err() {
                self.unpublished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                return;
            }
            for e in &events {
                self.publish_live(&key, e);
            }
        }
    }

    fn publish_live(&self, key: &str, event: &ProjectEvent) {
        let mut map = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(key)
            && tx.send(event.clone()).is_err()
        {
            map.remove(key);
        }
    }

    /// Starts a runner for `job` unless one runs for it already.
    fn spawn(self: &Arc<Self>, job: Job) {
        let id = (job.key.clone(), job.attempt, job.work());
        let (tx, rx) = watch::channel(false);
        let call = (job.undo || job.spec.kind == TaskKind::Tool).then(|| job.call_id());
        {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&id) {
                return;
            }
            map.insert(
                id.clone(),
                Inflight {
                    cancel: tx,
                    call,
                    handle: None,
                },
            );
            metrics::gauge!("soma_project_runners").set(map.len() as f64);
        }
        let handle = tokio::spawn(self.clone().run(job, rx));
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&id) {
            e.handle = Some(handle);
        }
    }

    /// A runner ends.
    fn finished(&self, job: &Job) {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(job.key.clone(), job.attempt, job.work()));
        metrics::gauge!("soma_project_runners").set(map.len() as f64);
    }

    /// Signals the runners of `task` of project `key` to cancel, and cancels their tool
    /// call at once: a runner stopped right after (a shutdown) must not leave the call running.
    fn cancel(&self, key: &str, task: u32) {
        let tenant = split_key(key).0;
        let map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for ((k, _, w), e) in map.iter() {
            if k == key && *w == Work::Run(task) {
                e.cancel.send_replace(true);
                if let Some(call) = &e.call
                    && let Err(err) = self.deps.tool_calls.cancel(tenant, call)
                {
                    tracing::warn!(call, error = %err, "cannot cancel a tool call");
                }
            }
        }
    }
}

/// The sha256 of a plan's text, hex.
pub(crate) fn digest(text: &str) -> String {
    use sha2::Digest;
    crate::constitution::hex(&sha2::Sha256::digest(text.as_bytes()))
}

/// The project actor.
pub struct ProjectActor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProjectActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectActor").finish_non_exhaustive()
    }
}

fn outcome_of(kind: &ProjectEventKind) -> Outcome {
    match kind {
        ProjectEventKind::TaskAwaiting { .. } => Outcome::PendingApproval,
        ProjectEventKind::TaskFailed { .. }
        | ProjectEventKind::Failed { .. }
        | ProjectEventKind::TaskCancelled { .. }
        | ProjectEventKind::Killed { .. } => Outcome::Failed,
        ProjectEventKind::CompensationEnded { error: Some(_), .. } => Outcome::Failed,
        ProjectEventKind::TaskDecided { decided, .. } if !decided.approved => Outcome::Denied,
        _ => Outcome::Succeeded,
    }
}

impl ProjectActor {
    /// Publishes `new` (a handling's events) on `agent.audit`; returns them for the stream.
    async fn publish(
        &self,
        key: &str,
        new: Vec<ProjectEvent>,
    ) -> std::result::Result<Vec<ProjectEvent>, HandlerError> {
        let (tenant, project) = split_key(key);
        for e in &new {
            let audit = AuditEvent {
                actor: format!("project/{project}"),
                action: format!("project.{}", e.kind.name()),
                outcome: outcome_of(&e.kind),
                session: None,
                detail: serde_json::json!({"seq": e.seq, "event": e.kind}),
            };
            self.shared
                .deps
                .tenants
                .audit(tenant, &audit, e.at_ms)
                .await
                .map_err(HandlerError::new)?;
        }
        Ok(new)
    }

    fn apply(
        &self,
        ctx: &mut Context<ProjectMsg>,
        key: &str,
        s: &ProjectState,
        plan: &Checked,
        effects: Vec<Effect>,
    ) -> std::result::Result<(), HandlerError> {
        for effect in effects {
            match effect {
                Effect::Run {
                    task,
                    attempt,
                    resumed,
                } => {
                    let spec = plan.plan.tasks[task as usize].clone();
                    let inputs = outputs_of(s, plan, &plan::referenced(&spec));
                    let decided = s.decisions.get(&task).filter(|d| d.approved).cloned();
                    // Only a run resumed right after its tool call's approval carries that
                    // approval to the call.
                    let approve_call = decided.clone().filter(|_| resumed);
                    let job = Job {
                        key: key.to_string(),
                        seq: ctx.seq(),
                        task,
                        attempt,
                        spec,
                        goal: s.goal.clone(),
                        user: s.user.clone(),
                        inputs,
                        decided,
                        approve_call,
                        undo: false,
                    };
                    self.shared.spawn(job);
                }
                Effect::Compensate { task } => {
                    let spec = plan.plan.tasks[task as usize].clone();
                    let mut names = plan::referenced(&spec);
                    names.insert(spec.id.clone());
                    let inputs = outputs_of(s, plan, &names);
                    let job = Job {
                        key: key.to_string(),
                        seq: ctx.seq(),
                        task,
                        attempt: 0,
                        spec,
                        goal: s.goal.clone(),
                        user: s.user.clone(),
                        inputs,
                        decided: None,
                        approve_call: None,
                        undo: true,
                    };
                    self.shared.spawn(job);
                }
                Effect::Cancel { task } => self.shared.cancel(key, task),
                Effect::RejectCall { call, by, comment } => {
                    let calls = self.shared.deps.tool_calls.clone();
                    let tenant = split_key(key).0.to_string();
                    tokio::spawn(async move {
                        match calls.reject(&tenant, &call, &by, &comment).await {
                            Ok(_) | Err(Error::NotAwaiting { .. }) => {}
                            Err(e) => {
                                tracing::warn!(tenant, call, error = %e, "cannot reject a tool call");
                            }
                        }
                    });
                }
                Effect::RetryAfter { task, after_ms } => ctx
                    .schedule(
                        Duration::from_millis(after_ms),
                        &ProjectMsg::RetryDue { task },
                    )
                    .map_err(HandlerError::new)?,
                Effect::TimeoutAfter {
                    task,
                    attempt,
                    after_ms,
                } => ctx
                    .schedule(
                        Duration::from_millis(after_ms),
                        &ProjectMsg::TimedOut { task, attempt },
                    )
                    .map_err(HandlerError::new)?,
            }
        }
        Ok(())
    }

    async fn on(
        &self,
        ctx: &mut Context<ProjectMsg>,
        key: &str,
        s: &mut ProjectState,
        msg: ProjectMsg,
    ) -> std::result::Result<(), HandlerError> {
        if let ProjectMsg::Erase = msg {
            *s = ProjectState::default();
            self.shared
                .hub
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            return Ok(());
        }
        if let ProjectMsg::Start {
            plan_seq,
            plan_digest,
            ..
        } = &msg
        {
            let plans = &self.shared.plans;
            plans
                .wait_handled(key, *plan_seq)
                .await
                .map_err(HandlerError::new)?;
            let stored = plans.state(key).await.map_err(HandlerError::new)?;
            if stored.as_deref().map(digest).as_ref() != Some(plan_digest) {
                return Ok(());
            }
            // A plan cached by another start of this id is not this one.
            let mut cache = self.shared.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.get(key).is_some_and(|(d, _)| d != plan_digest) {
                cache.remove(key);
            }
        }
        let Some(plan) = self.shared.plan(key).await? else {
            return Ok(());
        };
        let was_final = s.status.as_ref().is_some_and(ProjectStatus::is_final);
        let mut m = Machine {
            s,
            plan: &plan,
            now_ms: now_ms(),
            emitted: Vec::new(),
        };
        let effects = match msg {
            ProjectMsg::Start { goal, user, .. } => {
                let (tenant, _) = split_key(key);
                // Read when handled: once the tenant's erasure began, nothing starts.
                let live = self
                    .shared
                    .deps
                    .tenants
                    .is_live(tenant)
                    .await
                    .map_err(HandlerError::new)?;
                if m.s.exists || !live {
                    Vec::new()
                } else {
                    m.start(goal, user)
                }
            }
            _ if !m.s.exists => Vec::new(),
            ProjectMsg::Ran {
                task,
                attempt,
                outcome,
            } => m.ran(task, attempt, outcome),
            ProjectMsg::Compensated { task, error } => m.compensated(task, error),
            ProjectMsg::RetryDue { task } => m.retry_due(task),
            ProjectMsg::TimedOut { task, attempt } => m.timed_out(task, attempt),
            ProjectMsg::Decide { task, decided } => m.decide(task, decided).unwrap_or_default(),
            ProjectMsg::Kill { by, reason } => m.kill(by, reason).unwrap_or_default(),
            ProjectMsg::Resume => m.resume(),
            ProjectMsg::Erase => Vec::new(),
        };
        let emitted = std::mem::take(&mut m.emitted);
        if !was_final && let Some(status) = s.status.as_ref().filter(|st| st.is_final()) {
            metrics::counter!("soma_projects_ended_total", "status" => status.name()).increment(1);
            tracing::info!(project = key, status = status.name(), "project ended");
        }
        let new = self.publish(key, emitted).await?;
        self.apply(ctx, key, s, &plan, effects)?;
        self.shared.after_commit(key, ctx.seq(), new);
        Ok(())
    }
}

impl DurableActor for ProjectActor {
    type Msg = ProjectMsg;
    type State = ProjectState;

    fn init(&self, _key: &str) -> ProjectState {
        ProjectState::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<ProjectMsg>,
        s: &mut ProjectState,
        msg: ProjectMsg,
    ) -> std::result::Result<(), HandlerError> {
        let key = ctx.key().to_string();
        let (tenant, project) = split_key(&key);
        let span = tracing::info_span!("project", tenant, project);
        self.on(ctx, &key, s, msg).instrument(span).await
    }
}

/// The stored plan of a project, as JSON text (set once).
#[derive(Debug)]
pub struct PlanActor;

/// The plan actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PlanMsg {
    /// Stores the plan unless one is stored.
    Set(String),
    /// Forgets it.
    Erase,
}

impl DurableActor for PlanActor {
    type Msg = PlanMsg;
    type State = Option<String>;

    fn init(&self, _key: &str) -> Option<String> {
        None
    }

    async fn handle(
        &self,
        _ctx: &mut Context<PlanMsg>,
        s: &mut Option<String>,
        msg: PlanMsg,
    ) -> std::result::Result<(), HandlerError> {
        match msg {
            PlanMsg::Set(text) => {
                if s.is_none() {
                    *s = Some(text);
                }
            }
            PlanMsg::Erase => *s = None,
        }
        Ok(())
    }
}
