//! The projects' API: start, read, decide, kill, subscribe.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use serde_json::Value;
use soma_supervision::{Registry, RegistryOptions, Runtime};
use tokio::sync::broadcast;

use super::capsule::CapsuleActor;
use super::machine::{Decided, Gate, Phase, ProjectEvent, ProjectState, ProjectStatus};
use super::plan::{Checked, Plan, TaskKind};
use super::{
    Inflight, MAX_GOAL, PROJECT_LIVE_BUFFER, PlanActor, PlanMsg, ProjectActor, ProjectDeps,
    ProjectMsg, ProjectOptions, Shared,
};
use crate::error::{Error, Result};
use crate::tenant::check_id;
use crate::toolcall::now_ms;

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
    capsules: Registry<CapsuleActor>,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Projects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projects").finish_non_exhaustive()
    }
}

/// Project `id` as its state and plan say.
fn info(id: &str, s: &ProjectState, plan: &Checked) -> ProjectInfo {
    let tasks =
        plan.plan
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
    ProjectInfo {
        id: id.to_string(),
        goal: s.goal.clone(),
        user: s.user.clone(),
        status: s.status.clone().unwrap_or(ProjectStatus::Running),
        tasks,
        done: s.done,
        last_event: s.next_event,
        created_ms: s.created_ms,
        ended_ms: s.ended_ms,
    }
}

/// Project `id` has ended as `st`.
fn ended(id: &str, st: &ProjectStatus) -> Error {
    Error::Ended {
        what: "project",
        id: id.to_string(),
        status: st.name().into(),
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
        let mut capsule_options = RegistryOptions::new("capsule");
        capsule_options.passivate_after_ms = Some(10_000);
        let capsules = rt.registry(CapsuleActor, capsule_options).await?;
        let shared = Arc::new(Shared {
            deps,
            options,
            registry: OnceLock::new(),
            plans: plans.clone(),
            cache: Mutex::default(),
            inflight: Mutex::default(),
            tenant_slots: Mutex::default(),
            hub: Mutex::default(),
            unpublished: Mutex::default(),
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
        let _ = shared.registry.set(registry.downgrade());
        let projects = Self {
            registry,
            plans,
            capsules,
            shared,
        };
        projects.resume_all().await?;
        Ok(projects)
    }

    pub(super) fn capsules_reg(&self) -> &Registry<CapsuleActor> {
        &self.capsules
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
        let digest = super::digest(&text);
        let plan_seq = self.plans.send(&k, &PlanMsg::Set(text)).await?;
        // The handler checks the stored plan by its digest; it need not compile it again.
        let checked = Arc::new(checked);
        self.shared
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(k.clone())
            .or_insert_with(|| (digest.clone(), checked.clone()));
        let seq = self
            .registry
            .send(
                &k,
                &ProjectMsg::Start {
                    goal: goal.to_string(),
                    user: user.to_string(),
                    plan_seq,
                    plan_digest: digest,
                },
            )
            .await?;
        self.registry.wait_handled(&k, seq).await?;
        let s = self.registry.state(&k).await?;
        // Another start of the same id came first (its plan, or its start, was stored first;
        // the same start retried is not another one).
        if !s.exists || s.goal != goal || s.user != user {
            self.shared
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
            return Err(exists());
        }
        let stored = self.checked(&k).await?;
        if stored.plan != checked.plan {
            return Err(exists());
        }
        Ok(info(id, &s, &stored))
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
        Ok(info(id, &s, &plan))
    }

    async fn decide(
        &self,
        tenant: &str,
        id: &str,
        task: &str,
        decided: Decided,
    ) -> Result<ProjectInfo> {
        let (k, s) = self.existing(tenant, id).await?;
        let plan = self.checked(&k).await?;
        let i = plan
            .plan
            .tasks
            .iter()
            .position(|t| t.id == task)
            .map(|i| i as u32)
            .ok_or_else(|| Error::NotFound {
                what: "task",
                id: task.to_string(),
            })?;
        if let Some(st) = s
            .status
            .as_ref()
            .filter(|st| **st != ProjectStatus::Running)
        {
            return Err(ended(id, st));
        }
        if !s.gates.contains_key(&i) {
            return Err(Error::NotAwaiting {
                what: "task",
                id: task.to_string(),
            });
        }
        let seq = self
            .registry
            .send(
                &k,
                &ProjectMsg::Decide {
                    task: i,
                    decided: decided.clone(),
                },
            )
            .await?;
        self.registry.wait_handled(&k, seq).await?;
        // The handler decides whether the task still waited (it may have been decided, or
        // the project ended, since the state above was read).
        let after = self.registry.state(&k).await?;
        if after.decisions.get(&i) != Some(&decided) {
            if let Some(st) = after.status.as_ref().filter(|st| st.is_final()) {
                return Err(ended(id, st));
            }
            return Err(Error::NotAwaiting {
                what: "task",
                id: task.to_string(),
            });
        }
        Ok(info(id, &after, &plan))
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
            return Err(ended(id, st));
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
