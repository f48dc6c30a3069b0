//! A supervisor for ractor actors: one-for-one, one-for-all or rest-for-one, with restart
//! intensity escalating to the parent and exponential backoff with jitter.
//!
//! Use it for actors that are not durable (services, pools, gateways). Durable actors are
//! supervised by their [`Registry`](crate::Registry), which applies the same [`Policy`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::policy::{Backoff, Intensity, Restart, RestartWindow, Strategy};

/// Restart policy of a supervisor: data, not code.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Which children restart together.
    pub strategy: Strategy,
    /// How many restarts in a window before escalating.
    #[serde(default)]
    pub intensity: Intensity,
    /// Delay between restarts.
    #[serde(default)]
    pub backoff: Backoff,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            strategy: Strategy::OneForOne,
            intensity: Intensity::default(),
            backoff: Backoff::default(),
        }
    }
}

type StartFn =
    dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell>> + Send>> + Send + Sync;

/// How to start (and restart) one child.
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    restart: Restart,
    start: Arc<StartFn>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .finish_non_exhaustive()
    }
}

impl ChildSpec {
    /// A child made by `make` each time it (re)starts, linked to the supervisor.
    pub fn new<A, F>(name: impl Into<String>, restart: Restart, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let name = name.into();
        let child_name = name.clone();
        let make = Arc::new(make);
        let start = move |parent: ActorCell| {
            let make = make.clone();
            let name = child_name.clone();
            Box::pin(async move {
                let (actor, args) = make();
                match Actor::spawn_linked(None, actor, args, parent).await {
                    Ok((r, _)) => Ok(r.get_cell()),
                    Err(e) => Err(Error::Spawn {
                        name,
                        detail: e.to_string(),
                    }),
                }
            }) as Pin<Box<dyn Future<Output = Result<ActorCell>> + Send>>
        };
        Self {
            name,
            restart,
            start: Arc::new(start),
        }
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Messages a supervisor understands.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start again the children at these indices (sent to itself after a backoff).
    Restart(Vec<usize>),
    /// The live children, in start order: name and cell (`None` while down).
    Children(RpcReplyPort<Vec<(String, Option<ActorCell>)>>),
}

/// The supervisor actor. Start it with [`Supervisor::start`].
#[derive(Debug)]
pub struct Supervisor {
    name: String,
    policy: Policy,
}

/// A running supervisor's state.
#[derive(Debug)]
pub struct SupervisorState {
    children: Vec<(ChildSpec, Option<ActorCell>)>,
    window: RestartWindow,
}

impl Supervisor {
    /// A supervisor to start as a child of another one (see [`ChildSpec::new`]); use
    /// [`Supervisor::start`] for a root supervisor.
    pub fn new(name: impl Into<String>, policy: Policy) -> Self {
        Self {
            name: name.into(),
            policy,
        }
    }

    /// Starts a supervisor with `children`, linked to `parent` if given. Children start in
    /// order; if one fails to start, the supervisor fails to start.
    pub async fn start(
        name: impl Into<String>,
        policy: Policy,
        children: Vec<ChildSpec>,
        parent: Option<ActorCell>,
    ) -> Result<ActorRef<SupervisorMsg>> {
        policy.backoff.validate()?;
        let name = name.into();
        let sup = Supervisor {
            name: name.clone(),
            policy,
        };
        let spawned = match parent {
            Some(p) => Actor::spawn_linked(None, sup, children, p).await,
            None => Actor::spawn(None, sup, children).await,
        };
        spawned.map(|(r, _)| r).map_err(|e| Error::Spawn {
            name,
            detail: e.to_string(),
        })
    }

    fn affected(&self, failed: usize, count: usize) -> Vec<usize> {
        match self.policy.strategy {
            Strategy::OneForOne => vec![failed],
            Strategy::OneForAll => (0..count).collect(),
            Strategy::RestForOne => (failed..count).collect(),
        }
    }

    /// Records a restart; `Err` (escalation) when the intensity is exceeded.
    fn admit_restart(
        &self,
        state: &mut SupervisorState,
        child: &str,
    ) -> Result<Duration, ActorProcessingErr> {
        if !state.window.allow(&self.policy.intensity) {
            tracing::error!(
                supervisor = %self.name,
                child,
                max_restarts = self.policy.intensity.max_restarts,
                window_ms = self.policy.intensity.window_ms,
                "restart intensity exceeded, escalating"
            );
            return Err(format!(
                "supervisor {}: restart intensity exceeded by child {child}",
                self.name
            )
            .into());
        }
        crate::metrics::supervisor_restart(&self.name);
        Ok(self.policy.backoff.delay(state.window.recent()))
    }
}

async fn stop_child(cell: ActorCell) {
    if cell
        .stop_and_wait(
            Some("restarting with siblings".into()),
            Some(Duration::from_secs(5)),
        )
        .await
        .is_err()
    {
        cell.kill();
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Vec<ChildSpec>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        specs: Vec<ChildSpec>,
    ) -> Result<Self::State, ActorProcessingErr> {
        self.policy.backoff.validate()?;
        let mut children = Vec::with_capacity(specs.len());
        for spec in specs {
            let cell = (spec.start)(myself.get_cell()).await?;
            children.push((spec, Some(cell)));
        }
        Ok(SupervisorState {
            children,
            window: RestartWindow::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Children(reply) => {
                let list = state
                    .children
                    .iter()
                    .map(|(s, c)| (s.name.clone(), c.clone()))
                    .collect();
                let _ = reply.send(list);
            }
            SupervisorMsg::Restart(indices) => {
                for i in indices {
                    let Some((spec, slot)) = state.children.get_mut(i) else {
                        continue;
                    };
                    if slot.is_some() {
                        continue;
                    }
                    match (spec.start)(myself.get_cell()).await {
                        Ok(cell) => {
                            tracing::info!(supervisor = %self.name, child = %spec.name, "child restarted");
                            *slot = Some(cell);
                        }
                        Err(e) => {
                            let name = spec.name.clone();
                            tracing::warn!(supervisor = %self.name, child = %name, error = %e, "child failed to restart");
                            let delay = self.admit_restart(state, &name)?;
                            myself.send_after(delay, move || SupervisorMsg::Restart(vec![i]));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failed, why) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell.clone(), true, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let killed = reason.as_deref() == Some("killed");
                (cell.clone(), killed, reason.clone().unwrap_or_default())
            }
            _ => return Ok(()),
        };
        let Some(index) = state
            .children
            .iter()
            .position(|(_, c)| c.as_ref().is_some_and(|c| c.get_id() == cell.get_id()))
        else {
            return Ok(()); // a child we stopped ourselves, or already replaced
        };
        let spec = state.children[index].0.clone();
        state.children[index].1 = None;
        tracing::warn!(supervisor = %self.name, child = %spec.name, failed, reason = %why, "child exited");
        if !spec.restart.restarts(failed) {
            return Ok(());
        }
        let delay = self.admit_restart(state, &spec.name)?;
        let affected: Vec<usize> = self
            .affected(index, state.children.len())
            .into_iter()
            .filter(|&i| i == index || state.children[i].0.restart != Restart::Temporary)
            .collect();
        // Stop the siblings that restart with it, last started first.
        for &i in affected.iter().rev() {
            if let Some(sibling) = state.children[i].1.take() {
                stop_child(sibling).await;
            }
        }
        myself.send_after(delay, move || SupervisorMsg::Restart(affected));
        Ok(())
    }
}
