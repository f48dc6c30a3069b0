//! KAMACHIQ projects: a goal and a task DAG ([`Plan`]) run as one durable actor per project
//! (registry `project`, key `tenant/project`), in parallel waves under the tenant's
//! constitution, with approval gates, retries, timeouts, a kill switch and compensation.
//!
//! The project's state machine is [`machine`]; the work of each task run is done by a runner
//! ([`run`]) outside the handler, which reports back as a message, so the project answers
//! approvals and kills while its tasks run. The plan itself is stored once, as JSON, under the
//! same key in registry `project-plan`, and kept compiled in memory.

mod machine;
mod plan;
mod run;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use soma_adapters::{AuditEvent, Outcome};
use soma_inference::GeneratorPool;
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::tenant::{Tenants, check_id};
use crate::toolcall::{ToolCalls, now_ms, split_key};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Work {
    Run(u32),
    Undo,
}

struct Inflight {
    cancel: watch::Sender<bool>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// What the project actors and their runners share.
pub(crate) struct Shared {
    deps: ProjectDeps,
    options: ProjectOptions,
    registry: OnceLock<Registry<ProjectActor>>,
    plans: Registry<PlanActor>,
    cache: Mutex<HashMap<String, Arc<Checked>>>,
    inflight: Mutex<HashMap<(String, u32, Work), Inflight>>,
    idle: Notify,
    tenant_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    hub: Mutex<HashMap<String, broadcast::Sender<ProjectEvent>>>,
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
            return Ok(Some(p.clone()));
        }
        let Some(text) = self.plans.state(key).await.map_err(HandlerError::new)? else {
            return Ok(None);
        };
        let checked = Plan::from_json(&text)
            .and_then(|p| p.check(self.deps.tool_calls.tools()))
            .map_err(HandlerError::new)?;
        let checked = Arc::new(checked);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), checked.clone());
        Ok(Some(checked))
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
    fn spawn(self: &Arc<Self>, job: Job, work: Work) {
        let id = (job.key.clone(), job.attempt, work);
        let (tx, rx) = watch::channel(false);
        {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&id) {
                return;
            }
            map.insert(
                id.clone(),
                Inflight {
                    cancel: tx,
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
        let work = if job.undo {
            Work::Undo
        } else {
            Work::Run(job.task)
        };
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(job.key.clone(), job.attempt, work));
        metrics::gauge!("soma_project_runners").set(map.len() as f64);
        if map.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// Signals the runners of `task` of project `key` to cancel.
    fn cancel(&self, key: &str, task: u32) {
        let map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for ((k, _, w), e) in map.iter() {
            if k == key && *w == Work::Run(task) {
                e.cancel.send_replace(true);
            }
        }
    }
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
    /// Streams the events after `before` and publishes them on `agent.audit`.
    async fn publish(
        &self,
        key: &str,
        s: &ProjectState,
        before: u64,
    ) -> std::result::Result<(), HandlerError> {
        let (tenant, project) = split_key(key);
        for e in s.events.iter().filter(|e| e.seq > before) {
            self.shared.publish_live(key, e);
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
        Ok(())
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
                Effect::Run { task, attempt } => {
                    let spec = plan.plan.tasks[task as usize].clone();
                    let inputs = outputs_of(s, plan, &plan::referenced(&spec));
                    let approved = s.decisions.get(&task).is_some_and(|d| d.approved);
                    let job = Job {
                        key: key.to_string(),
                        seq: ctx.seq(),
                        task,
                        attempt,
                        spec,
                        goal: s.goal.clone(),
                        user: s.user.clone(),
                        inputs,
                        approved,
                        undo: false,
                    };
                    self.shared.spawn(job, Work::Run(task));
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
                        approved: true,
                        undo: true,
                    };
                    self.shared.spawn(job, Work::Undo);
                }
                Effect::Cancel { task } => self.shared.cancel(key, task),
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
        if let ProjectMsg::Start { plan_seq, .. } = &msg {
            self.shared
                .plans
                .wait_handled(key, *plan_seq)
                .await
                .map_err(HandlerError::new)?;
        }
        let Some(plan) = self.shared.plan(key).await? else {
            return Ok(());
        };
        let before = s.next_event;
        let was_final = s.status.as_ref().is_some_and(ProjectStatus::is_final);
        let mut m = Machine {
            s,
            plan: &plan,
            now_ms: now_ms(),
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
        if !was_final && let Some(status) = s.status.as_ref().filter(|st| st.is_final()) {
            metrics::counter!("soma_projects_ended_total", "status" => status.name()).increment(1);
            tracing::info!(project = key, status = status.name(), "project ended");
        }
        self.publish(key, s, before).await?;
        self.apply(ctx, key, s, &plan, effects)
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

/// One task as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskInfo {
    /// Its id.
    pub id: String,
    /// What it does.
    pub kind: TaskKind,
    /// Where it stands.
    pub phase: Phase,
    /// Runs started.
    pub attempts: u32,
    /// What it waits for, when gated.
    pub gate: Option<Gate>,
    /// The human decision on it, if any.
    pub decided: Option<Decided>,
    /// Its output, once done.
    pub output: Option<Value>,
    /// Its last error, if a run failed.
    pub error: Option<String>,
}

/// A project as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectInfo {
    /// Its id.
    pub id: String,
    /// Its goal.
    pub goal: String,
    /// Who started it.
    pub user: String,
    /// Where it stands.
    pub status: ProjectStatus,
    /// Its tasks, in plan order.
    pub tasks: Vec<TaskInfo>,
    /// Tasks done.
    pub done: u32,
    /// The seq of its newest event.
    pub last_event: u64,
    /// When it started, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it ended, if it did.
    pub ended_ms: Option<u64>,
}

impl ProjectInfo {
    /// The task called `id`.
    pub fn task(&self, id: &str) -> Option<&TaskInfo> {
        self.tasks.iter().find(|t| t.id == id)
    }
}

/// A subscription to a project: its kept events from the seq asked for, then live ones.
#[derive(Debug)]
pub struct ProjectSubscription {
    backlog: VecDeque<ProjectEvent>,
    live: broadcast::Receiver<ProjectEvent>,
    last: u64,
    project: String,
}

impl ProjectSubscription {
    /// The next event; `None` when the project was erased or the runtime stopped.
    /// [`Error::Lagged`] when this subscriber fell too far behind: resubscribe from the seq
    /// it names.
    pub async fn next(&mut self) -> Option<Result<ProjectEvent>> {
        if let Some(e) = self.backlog.pop_front() {
            self.last = e.seq;
            return Some(Ok(e));
        }
        loop {
            match self.live.recv().await {
                Ok(e) if e.seq <= self.last => continue,
                Ok(e) => {
                    self.last = e.seq;
                    return Some(Ok(e));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(Err(Error::Lagged {
                        session: self.project.clone(),
                        missed: n,
                        resume_from: self.last + 1,
                    }));
                }
            }
        }
    }
}

/// The projects of a runtime.
#[derive(Clone)]
pub struct Projects {
    registry: Registry<ProjectActor>,
    plans: Registry<PlanActor>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Projects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projects").finish_non_exhaustive()
    }
}

fn key(tenant: &str, id: &str) -> Result<String> {
    check_id(tenant)?;
    check_id(id)?;
    Ok(format!("{tenant}/{id}"))
}

impl Projects {
    /// The projects of `rt` (registries `project` and `project-plan`); the projects that had
    /// not ended when the runtime last stopped go on.
    pub async fn open(rt: &Runtime, deps: ProjectDeps, options: ProjectOptions) -> Result<Self> {
        options.validate()?;
        if let Some(m) = &options.default_model
            && !deps.generators.contains_key(m)
        {
            return Err(Error::Config(format!(
                "projects.default_model {m:?} is not loaded"
            )));
        }
        let mut plan_options = RegistryOptions::new("project-plan");
        plan_options.passivate_after_ms = Some(10_000);
        let plans = rt.registry(PlanActor, plan_options).await?;
        let shared = Arc::new(Shared {
            deps,
            options,
            registry: OnceLock::new(),
            plans: plans.clone(),
            cache: Mutex::default(),
            inflight: Mutex::default(),
            idle: Notify::new(),
            tenant_slots: Mutex::default(),
            hub: Mutex::default(),
        });
        let mut project_options = RegistryOptions::new("project");
        project_options.passivate_after_ms = Some(300_000);
        // Reports of runs arrive in bursts: many wait rather than fail.
        project_options.max_in_flight = 65_536;
        let registry = rt
            .registry(
                ProjectActor {
                    shared: shared.clone(),
                },
                project_options,
            )
            .await?;
        let _ = shared.registry.set(registry.clone());
        let projects = Self {
            registry,
            plans,
            shared,
        };
        projects.resume_all().await?;
        Ok(projects)
    }

    /// Sends `Resume` to every project that has not ended.
    async fn resume_all(&self) -> Result<()> {
        let mut resumed = 0u64;
        for key in self.registry.keys("").await? {
            let s = self.registry.state(&key).await?;
            if s.exists && !s.status.as_ref().is_some_and(ProjectStatus::is_final) {
                self.registry.send(&key, &ProjectMsg::Resume).await?;
                resumed += 1;
            }
        }
        if resumed > 0 {
            tracing::info!(projects = resumed, "projects resumed");
        }
        Ok(())
    }

    /// Starts project `id` of `tenant` for `user`: `plan` is validated (an error names what is
    /// wrong), stored, and its first wave dispatched before this returns.
    pub async fn start(
        &self,
        tenant: &str,
        id: &str,
        user: &str,
        goal: &str,
        plan: Plan,
    ) -> Result<ProjectInfo> {
        let k = key(tenant, id)?;
        check_id(user)?;
        if goal.trim().is_empty() || goal.len() > MAX_GOAL {
            return Err(Error::Invalid(format!(
                "a goal is 1-{MAX_GOAL} bytes of text"
            )));
        }
        let checked = plan.check(self.shared.deps.tool_calls.tools())?;
        let default_model = self.shared.default_model();
        for t in &checked.plan.tasks {
            if t.kind != TaskKind::Agent {
                continue;
            }
            match t.model.as_ref().or(default_model.as_ref()) {
                Some(m) if self.shared.deps.generators.contains_key(m) => {}
                Some(m) => {
                    return Err(Error::InvalidPlan {
                        task: Some(t.id.clone()),
                        reason: format!(
                            "model {m:?} is not loaded (loaded: {:?})",
                            self.shared.deps.generators.keys().collect::<Vec<_>>()
                        ),
                    });
                }
                None => {
                    return Err(Error::InvalidPlan {
                        task: Some(t.id.clone()),
                        reason: "no model is loaded for agent tasks".into(),
                    });
                }
            }
        }
        self.shared.deps.tenants.get(tenant).await?;
        let exists = || Error::AlreadyExists {
            what: "project",
            id: id.to_string(),
        };
        if self.registry.state(&k).await?.exists {
            return Err(exists());
        }
        let text = serde_json::to_string(&checked.plan)
            .map_err(|e| Error::Invalid(format!("the plan cannot be stored: {e}")))?;
        // The start follows the plan's append; the project's handler waits for the plan's
        // message to be handled before it reads the plan.
        let plan_seq = self.plans.send(&k, &PlanMsg::Set(text.clone())).await?;
        let seq = self
            .registry
            .send(
                &k,
                &ProjectMsg::Start {
                    goal: goal.to_string(),
                    user: user.to_string(),
                    plan_seq,
                },
            )
            .await?;
        self.registry.wait_handled(&k, seq).await?;
        if self.plans.state(&k).await?.as_deref() != Some(text.as_str()) {
            // Another start of the same id stored its plan first.
            return Err(exists());
        }
        self.status(tenant, id).await
    }

    async fn existing(&self, tenant: &str, id: &str) -> Result<(String, ProjectState)> {
        let k = key(tenant, id)?;
        let s = self.registry.state(&k).await?;
        if s.exists && self.shared.deps.tenants.is_live(tenant).await? {
            Ok((k, s))
        } else {
            Err(Error::NotFound {
                what: "project",
                id: id.to_string(),
            })
        }
    }

    async fn checked(&self, k: &str) -> Result<Arc<Checked>> {
        self.shared
            .plan(k)
            .await
            .map_err(|e| Error::Invalid(format!("the stored plan: {e}")))?
            .ok_or_else(|| Error::NotFound {
                what: "project plan",
                id: k.to_string(),
            })
    }

    /// Project `id` of `tenant` as it stands.
    pub async fn status(&self, tenant: &str, id: &str) -> Result<ProjectInfo> {
        let (k, s) = self.existing(tenant, id).await?;
        let plan = self.checked(&k).await?;
        let tasks = plan
            .plan
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let i = i as u32;
                let slot = s.tasks.get(i as usize);
                TaskInfo {
                    id: t.id.clone(),
                    kind: t.kind,
                    phase: slot.map_or(Phase::Waiting, |x| x.phase),
                    attempts: slot.map_or(0, |x| x.attempts),
                    gate: s.gates.get(&i).cloned(),
                    decided: s.decisions.get(&i).cloned(),
                    output: s.outputs.get(&i).map(|o| {
                        serde_json::from_str(o).unwrap_or_else(|_| Value::String(o.clone()))
                    }),
                    error: s.errors.get(&i).cloned(),
                }
            })
            .collect();
        Ok(ProjectInfo {
            id: id.to_string(),
            goal: s.goal.clone(),
            user: s.user.clone(),
            status: s.status.clone().unwrap_or(ProjectStatus::Running),
            tasks,
            done: s.done,
            last_event: s.next_event,
            created_ms: s.created_ms,
            ended_ms: s.ended_ms,
        })
    }

    async fn task_index(&self, k: &str, task: &str) -> Result<u32> {
        let plan = self.checked(k).await?;
        plan.plan
            .tasks
            .iter()
            .position(|t| t.id == task)
            .map(|i| i as u32)
            .ok_or_else(|| Error::NotFound {
                what: "task",
                id: task.to_string(),
            })
    }

    async fn decide(
        &self,
        tenant: &str,
        id: &str,
        task: &str,
        decided: Decided,
    ) -> Result<ProjectInfo> {
        let (k, s) = self.existing(tenant, id).await?;
        let i = self.task_index(&k, task).await?;
        if let Some(st) = s
            .status
            .as_ref()
            .filter(|st| **st != ProjectStatus::Running)
        {
            return Err(Error::Ended {
                what: "project",
                id: id.to_string(),
                status: st.name().into(),
            });
        }
        let Some(gate) = s.gates.get(&i) else {
            return Err(Error::NotAwaiting {
                what: "task",
                id: task.to_string(),
            });
        };
        // A tool call the constitution escalated is decided on the call itself first.
        if let Gate::ToolCall { call, .. } = gate {
            let calls = &self.shared.deps.tool_calls;
            let r = if decided.approved {
                calls
                    .approve(tenant, call, &decided.by, &decided.comment)
                    .await
            } else {
                calls
                    .reject(tenant, call, &decided.by, &decided.comment)
                    .await
            };
            match r {
                // Decided before (a retried approval after a crash): the project goes on.
                Ok(_) | Err(Error::NotAwaiting { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let seq = self
            .registry
            .send(&k, &ProjectMsg::Decide { task: i, decided })
            .await?;
        self.registry.wait_handled(&k, seq).await?;
        self.status(tenant, id).await
    }

    /// Approves gated task `task` of project `id`: it goes on.
    pub async fn approve(
        &self,
        tenant: &str,
        id: &str,
        task: &str,
        by: &str,
        comment: &str,
    ) -> Result<ProjectInfo> {
        let decided = Decided {
            approved: true,
            by: by.to_string(),
            comment: comment.to_string(),
            at_ms: now_ms(),
        };
        self.decide(tenant, id, task, decided).await
    }

    /// Rejects gated task `task` of project `id`: it fails, and so does the project (after
    /// its compensations).
    pub async fn reject(
        &self,
        tenant: &str,
        id: &str,
        task: &str,
        by: &str,
        comment: &str,
    ) -> Result<ProjectInfo> {
        let decided = Decided {
            approved: false,
            by: by.to_string(),
            comment: comment.to_string(),
            at_ms: now_ms(),
        };
        self.decide(tenant, id, task, decided).await
    }

    /// Kills project `id`: running tasks are cancelled, nothing else starts, and it cannot
    /// be resumed (it can still be read).
    pub async fn kill(
        &self,
        tenant: &str,
        id: &str,
        by: &str,
        reason: &str,
    ) -> Result<ProjectInfo> {
        let (k, s) = self.existing(tenant, id).await?;
        if let Some(st) = s.status.as_ref().filter(|st| st.is_final()) {
            return Err(Error::Ended {
                what: "project",
                id: id.to_string(),
                status: st.name().into(),
            });
        }
        let seq = self
            .registry
            .send(
                &k,
                &ProjectMsg::Kill {
                    by: by.to_string(),
                    reason: reason.to_string(),
                },
            )
            .await?;
        self.registry.wait_handled(&k, seq).await?;
        self.status(tenant, id).await
    }

    /// Kills every project of `tenant` that has not ended; returns how many.
    pub async fn kill_tenant(&self, tenant: &str, by: &str, reason: &str) -> Result<usize> {
        check_id(tenant)?;
        let mut waits = Vec::new();
        for k in self.registry.keys(&format!("{tenant}/")).await? {
            let s = self.registry.state(&k).await?;
            if !s.exists || s.status.as_ref().is_some_and(ProjectStatus::is_final) {
                continue;
            }
            let msg = ProjectMsg::Kill {
                by: by.to_string(),
                reason: reason.to_string(),
            };
            waits.push((k.clone(), self.registry.send(&k, &msg).await?));
        }
        for (k, seq) in &waits {
            self.registry.wait_handled(k, *seq).await?;
        }
        Ok(waits.len())
    }

    /// The events of project `id` from seq `from` (1 for all kept), then live ones.
    /// [`Error::EventsGone`] if events from `from` on are no longer all kept.
    pub async fn subscribe(
        &self,
        tenant: &str,
        id: &str,
        from: u64,
    ) -> Result<ProjectSubscription> {
        let k = key(tenant, id)?;
        let live = {
            let mut map = self.shared.hub.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(k.clone())
                .or_insert_with(|| broadcast::channel(PROJECT_LIVE_BUFFER).0)
                .subscribe()
        };
        let (_, s) = self.existing(tenant, id).await?;
        // Past the newest event: from the next one.
        let from = from.max(1).min(s.next_event + 1);
        let oldest = s.events.front().map_or(s.next_event + 1, |e| e.seq);
        if from < oldest && from <= s.next_event {
            return Err(Error::EventsGone {
                what: "project",
                id: id.to_string(),
                oldest,
            });
        }
        let backlog: VecDeque<ProjectEvent> =
            s.events.iter().filter(|e| e.seq >= from).cloned().collect();
        Ok(ProjectSubscription {
            last: from - 1,
            backlog,
            live,
            project: id.to_string(),
        })
    }

    /// Waits until project `id` has ended, and returns it.
    pub async fn wait_ended(&self, tenant: &str, id: &str) -> Result<ProjectInfo> {
        let mut sub = self.subscribe(tenant, id, u64::MAX).await?;
        loop {
            let info = self.status(tenant, id).await?;
            if info.status.is_final() {
                return Ok(info);
            }
            match sub.next().await {
                Some(Ok(_)) => {}
                Some(Err(Error::Lagged { .. })) => {
                    sub = self.subscribe(tenant, id, u64::MAX).await?;
                }
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(Error::Runtime(soma_supervision::Error::Stopped {
                        what: "projects",
                    }));
                }
            }
        }
    }

    /// Stops every runner of this process without reporting (their runs resume when the
    /// projects are opened again); call before the runtime's shutdown.
    pub async fn shutdown(&self) {
        let runners: Vec<Inflight> = {
            let mut map = self
                .shared
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.drain().map(|(_, v)| v).collect()
        };
        for r in runners {
            if let Some(h) = r.handle {
                h.abort();
                let _ = h.await;
            }
        }
        metrics::gauge!("soma_project_runners").set(0.0);
    }

    /// Runners under way in this process.
    pub fn runners(&self) -> usize {
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
