//! Sessions as durable actors, keyed `tenant/session` in registry `session`: a conversation
//! of a user with one agent (a [`Persona`]), one durable turn per user message (see
//! [`agent`]), its events numbered and kept, its tokens streamed to subscribers.
//!
//! What survives a SIGKILL: every acknowledged user message gets its turn; a turn that was in
//! progress is replayed from its start, reusing the tool calls it had made (a call whose
//! result was journaled never runs again); the events of committed turns are kept and a
//! subscriber resubscribes from a sequence number. Tokens are not durable: a replayed turn
//! streams its answer again, and the answer it commits is the one the history and the events
//! keep. A cancel is not durable either: it stops the turn running in this process.

mod agent;
mod erase;
mod hub;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use soma_adapters::{EpisodicMemory, Scope};
use soma_inference::GeneratorPool;
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};
use tokio::sync::watch;
use tracing::Instrument;

pub use agent::{HISTORY_ENTRIES, MAX_EVENT_TEXT, TOOL_STEP_MARGIN, TOOL_STEP_TOKENS};
pub use erase::ErasureReport;
pub use hub::{LIVE_BUFFER, Subscription, Update};

use crate::directory::DirectoryMsg;
use crate::error::{Error, Result};
use crate::tenant::{Tenants, check_id};
use crate::toolcall::{CallStatus, ToolCalls, now_ms};
use crate::tools::Memory;

/// Bytes of a user message, at most.
pub const MAX_MESSAGE_TEXT: usize = 32 * 1024;

/// Events a session keeps (the oldest are dropped past this; the history stays in episodic
/// memory).
pub const MAX_EVENTS: usize = 1000;

/// Bytes of text the kept events hold, at most (the oldest are dropped past this): with
/// [`MAX_EVENTS`] it bounds the state a session commits after each message.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Messages that may wait behind a turn waiting for an approval; more are refused.
pub const MAX_DEFERRED: usize = 16;

/// How the agent uses its tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolUse {
    /// The model decides at every step.
    #[default]
    Auto,
    /// The first step of every turn calls a tool; then the model decides.
    FirstStep,
}

/// The agent of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Persona {
    /// Its name (the principal of its tool calls).
    pub name: String,
    /// Its system prompt.
    pub system_prompt: String,
    /// The generator model, by name.
    pub model: String,
    /// The tools it may call.
    pub tools: Vec<String>,
    /// How it uses them.
    pub tool_use: ToolUse,
    /// Tool calls per turn, at most (1-16); then it answers.
    pub max_steps: u32,
    /// Tokens generated per model call, at most (1-4096).
    pub max_tokens_per_turn: u32,
    /// Sampling temperature (0 for greedy).
    pub temperature: f32,
    /// Memories recalled into the prompt per turn (0-10).
    pub recall: u32,
}

impl Default for Persona {
    fn default() -> Self {
        Self {
            name: "assistant".into(),
            system_prompt: "You are a helpful assistant.".into(),
            model: String::new(),
            tools: Vec::new(),
            tool_use: ToolUse::Auto,
            max_steps: 4,
            max_tokens_per_turn: 256,
            temperature: 0.0,
            recall: 0,
        }
    }
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnEnd {
    /// With an answer.
    Answered,
    /// The constitution refused a step.
    Denied {
        /// Why.
        reasons: Vec<String>,
    },
    /// Cancelled while it ran.
    Cancelled,
    /// A tool call, or a step the constitution escalated, waits for a human approval; the
    /// turn goes on once it is decided ([`Sessions::decide_approval`]).
    AwaitingApproval {
        /// What to decide: a tool call's id, or a gate's (`session-turn-message`,
        /// `session-turn-recall`, `session-turn-step-generate`).
        approval: String,
    },
    /// It failed.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// A human's decision of an escalated step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Approved or rejected.
    pub approved: bool,
    /// Who decided.
    pub by: String,
    /// Why.
    pub comment: String,
}

/// What happened in a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A user message was accepted.
    UserMessage {
        /// Its text.
        text: String,
    },
    /// The agent called a tool.
    ToolCall {
        /// The call's id.
        call_id: String,
        /// The tool.
        tool: String,
        /// Its arguments, JSON text.
        arguments: String,
    },
    /// A tool call ended.
    ToolResult {
        /// The call's id.
        call_id: String,
        /// Whether it succeeded.
        ok: bool,
        /// Its result (or error), JSON text.
        result: String,
    },
    /// The agent answered.
    Answer {
        /// The answer.
        text: String,
    },
    /// The turn ended.
    TurnEnded {
        /// How.
        end: TurnEnd,
    },
}

impl EventKind {
    /// Roughly the bytes it holds.
    fn weight(&self) -> usize {
        64 + match self {
            Self::UserMessage { text } | Self::Answer { text } => text.len(),
            Self::ToolCall {
                call_id,
                tool,
                arguments,
            } => call_id.len() + tool.len() + arguments.len(),
            Self::ToolResult {
                call_id, result, ..
            } => call_id.len() + result.len(),
            Self::TurnEnded { end } => format!("{end:?}").len(),
        }
    }
}

/// An event with its place in the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// Its sequence number in the session, from 1.
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The turn it belongs to (the user message's journal seq).
    pub turn: u64,
    /// What happened.
    pub kind: EventKind,
}

/// A session's durable state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionState {
    exists: bool,
    deleted: bool,
    user: String,
    persona: Option<Persona>,
    events: VecDeque<SessionEvent>,
    /// What the kept events weigh ([`EventKind::weight`]).
    event_bytes: usize,
    next_event: u64,
    /// A turn waiting for an approval: (turn, user message, what to decide).
    waiting: Option<(u64, String, String)>,
    /// Decisions of escalated gates, by gate id (of the waiting turn only).
    approvals: BTreeMap<String, Approval>,
    /// Messages accepted while a turn waits for an approval: their turns run, in order, once
    /// it has ended.
    deferred: VecDeque<(u64, String)>,
    /// Tokens (in, out) per model.
    usage: BTreeMap<String, (u64, u64)>,
}

/// The session actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SessionMsg {
    /// Opens the session.
    Create {
        /// The user.
        user: String,
        /// The agent.
        persona: Persona,
    },
    /// A user message: runs a turn.
    UserMessage {
        /// The text.
        text: String,
    },
    /// Goes on with the turn that waited for a tool call's approval.
    Resume,
    /// Decides the escalated gate the turn waits for, and goes on with the turn.
    DecideGate {
        /// The gate.
        gate: String,
        /// The decision.
        approval: Approval,
    },
    /// Closes the session and erases its history.
    Delete,
    /// Forgets the session entirely (its tenant is erased).
    Erase,
}

/// What the session actors share.
pub(crate) struct Shared {
    deps: SessionDeps,
    hub: hub::Hub,
    cancels: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl Shared {
    /// Records an event in `s` and streams it.
    fn emit(&self, key: &str, s: &mut SessionState, turn: u64, kind: EventKind) {
        s.next_event += 1;
        let event = SessionEvent {
            seq: s.next_event,
            at_ms: now_ms(),
            turn,
            kind,
        };
        s.event_bytes += event.kind.weight();
        s.events.push_back(event.clone());
        while s.events.len() > 1 && (s.events.len() > MAX_EVENTS || s.event_bytes > MAX_EVENT_BYTES)
        {
            if let Some(old) = s.events.pop_front() {
                s.event_bytes = s.event_bytes.saturating_sub(old.kind.weight());
            }
        }
        self.hub.publish(key, Update::Event(event));
    }
}

/// What sessions are built from.
pub struct SessionDeps {
    /// The tenants (constitutions, metering).
    pub tenants: Tenants,
    /// Tool calls (and the tools).
    pub tool_calls: ToolCalls,
    /// Long-term memory for recall, if any.
    pub memory: Option<Memory>,
    /// Where histories live.
    pub episodic: Arc<dyn EpisodicMemory>,
    /// Generator pools by model name.
    pub generators: BTreeMap<String, Arc<GeneratorPool>>,
}

/// The session actor.
pub struct SessionActor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SessionActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionActor").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SessionDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionDeps")
            .field("memory", &self.memory)
            .field("episodic", &self.episodic)
            .field("generators", &self.generators.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SessionActor {
    async fn turn(&self, key: &str, s: &mut SessionState, turn: u64, text: String) {
        let (tenant, session) = crate::toolcall::split_key(key);
        let (tx, rx) = watch::channel(false);
        self.shared
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), tx);
        let span = tracing::info_span!("session.turn", tenant, session, turn);
        let end = agent::Turn {
            shared: &self.shared,
            key,
            tenant,
            session,
            turn,
            text: &text,
            cancel: rx,
        }
        .run(s)
        .instrument(span)
        .await;
        self.shared
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        let label = match &end {
            TurnEnd::Answered => "answered",
            TurnEnd::Denied { .. } => "denied",
            TurnEnd::Cancelled => "cancelled",
            TurnEnd::AwaitingApproval { .. } => "awaiting_approval",
            TurnEnd::Failed { .. } => "failed",
        };
        metrics::counter!("soma_session_turns_total", "outcome" => label).increment(1);
        if let TurnEnd::Failed { message } = &end {
            tracing::warn!(tenant, session, turn, message, "turn failed");
        }
        s.waiting = match &end {
            TurnEnd::AwaitingApproval { approval } => Some((turn, text, approval.clone())),
            _ => None,
        };
        self.shared.emit(key, s, turn, EventKind::TurnEnded { end });
    }
}

impl SessionActor {
    /// Runs the turns deferred behind one that waited, until one waits again.
    async fn run_deferred(&self, key: &str, s: &mut SessionState) {
        if s.waiting.is_none() {
            s.approvals.clear();
        }
        while s.waiting.is_none() {
            let Some((turn, text)) = s.deferred.pop_front() else {
                break;
            };
            self.turn(key, s, turn, text).await;
        }
    }
}

impl DurableActor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;

    fn init(&self, _key: &str) -> SessionState {
        SessionState::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<SessionMsg>,
        s: &mut SessionState,
        msg: SessionMsg,
    ) -> std::result::Result<(), HandlerError> {
        let key = ctx.key().to_string();
        match msg {
            SessionMsg::Create { user, persona } => {
                let (tenant, _) = crate::toolcall::split_key(&key);
                // Read when handled: once the tenant's erasure began, nothing is created.
                let live = self
                    .shared
                    .deps
                    .tenants
                    .is_live(tenant)
                    .await
                    .map_err(HandlerError::new)?;
                if !s.exists && live {
                    *s = SessionState {
                        exists: true,
                        user,
                        persona: Some(persona),
                        ..SessionState::default()
                    };
                }
            }
            SessionMsg::Erase => {
                *s = SessionState::default();
                self.shared.hub.remove(&key);
            }
            _ if !s.exists || s.deleted => {}
            SessionMsg::UserMessage { text } => {
                let turn = ctx.seq();
                self.shared
                    .emit(&key, s, turn, EventKind::UserMessage { text: text.clone() });
                if s.waiting.is_some() && s.deferred.len() >= MAX_DEFERRED {
                    let end = TurnEnd::Failed {
                        message: format!(
                            "{MAX_DEFERRED} messages already wait for an approval; send this one once it is decided"
                        ),
                    };
                    self.shared
                        .emit(&key, s, turn, EventKind::TurnEnded { end });
                } else if s.waiting.is_some() {
                    // Turns run one at a time, in order: this one after the waiting one.
                    s.deferred.push_back((turn, text));
                } else {
                    self.turn(&key, s, turn, text).await;
                }
            }
            SessionMsg::DecideGate { gate, approval } => {
                if let Some((turn, text, waiting)) = s.waiting.take() {
                    if waiting == gate {
                        s.approvals.insert(gate, approval);
                    }
                    self.turn(&key, s, turn, text).await;
                    self.run_deferred(&key, s).await;
                }
            }
            SessionMsg::Resume => {
                if let Some((turn, text, _)) = s.waiting.take() {
                    self.turn(&key, s, turn, text).await;
                    self.run_deferred(&key, s).await;
                }
            }
            SessionMsg::Delete => {
                let (tenant, session) = crate::toolcall::split_key(&key);
                let scope = Scope::new(tenant, session).map_err(HandlerError::new)?;
                self.shared
                    .deps
                    .episodic
                    .erase_session(&scope)
                    .await
                    .map_err(HandlerError::new)?;
                *s = SessionState {
                    exists: true,
                    deleted: true,
                    ..SessionState::default()
                };
                self.shared.hub.remove(&key);
            }
        }
        Ok(())
    }
}

/// A session as read.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// Its id.
    pub id: String,
    /// Its user.
    pub user: String,
    /// Its agent.
    pub persona: Persona,
    /// Events so far (the seq of the newest).
    pub last_event: u64,
    /// A turn waiting for an approval, and what to decide (see
    /// [`TurnEnd::AwaitingApproval`]).
    pub waiting: Option<(u64, String)>,
    /// Tokens (in, out) per model.
    pub usage: BTreeMap<String, (u64, u64)>,
}

/// The sessions of a runtime.
#[derive(Clone)]
pub struct Sessions {
    registry: Registry<SessionActor>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    /// The sessions of `rt` (registry `session`).
    pub async fn open(rt: &Runtime, deps: SessionDeps) -> Result<Self> {
        let shared = Arc::new(Shared {
            deps,
            hub: hub::Hub::default(),
            cancels: Mutex::default(),
        });
        let mut options = RegistryOptions::new("session");
        options.passivate_after_ms = Some(300_000);
        let actor = SessionActor {
            shared: shared.clone(),
        };
        Ok(Self {
            registry: rt.registry(actor, options).await?,
            shared,
        })
    }

    fn key(tenant: &str, id: &str) -> Result<String> {
        check_id(tenant)?;
        check_id(id)?;
        Ok(format!("{tenant}/{id}"))
    }

    fn check_persona(&self, p: &Persona) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("persona: {m}")));
        if !self.shared.deps.generators.contains_key(&p.model) {
            let loaded: Vec<&String> = self.shared.deps.generators.keys().collect();
            return bad(format!(
                "model {:?} is not loaded (loaded: {loaded:?})",
                p.model
            ));
        }
        let registered = self.shared.deps.tool_calls.tools().names();
        if let Some(t) = p.tools.iter().find(|t| !registered.contains(t)) {
            return bad(format!(
                "tool {t:?} is not registered (registered: {registered:?})"
            ));
        }
        if !(1..=16).contains(&p.max_steps) {
            return bad(format!("max_steps must be 1-16, got {}", p.max_steps));
        }
        if !(1..=4096).contains(&p.max_tokens_per_turn) {
            return bad(format!(
                "max_tokens_per_turn must be 1-4096, got {}",
                p.max_tokens_per_turn
            ));
        }
        if !(0.0..=2.0).contains(&p.temperature) {
            return bad(format!("temperature must be 0-2, got {}", p.temperature));
        }
        if p.recall > 10 {
            return bad(format!("recall must be 0-10, got {}", p.recall));
        }
        if p.recall > 0 && self.shared.deps.memory.is_none() {
            return bad("recall needs long-term memory, which this runtime has not".into());
        }
        Ok(())
    }

    async fn existing(&self, tenant: &str, id: &str) -> Result<(String, SessionState)> {
        let key = Self::key(tenant, id)?;
        let s = self.registry.state(&key).await?;
        // A tenant being erased has nothing any more, even before its sessions are reached.
        if s.exists && !s.deleted && self.shared.deps.tenants.is_live(tenant).await? {
            Ok((key, s))
        } else {
            Err(Error::NotFound {
                what: "session",
                id: id.to_string(),
            })
        }
    }

    /// Opens session `id` of `tenant` for `user` with `persona`.
    pub async fn create(
        &self,
        tenant: &str,
        id: &str,
        user: &str,
        persona: Persona,
    ) -> Result<SessionInfo> {
        let key = Self::key(tenant, id)?;
        check_id(user)?;
        self.check_persona(&persona)?;
        let t = self.shared.deps.tenants.get(tenant).await?;
        if self.registry.state(&key).await?.exists {
            return Err(Error::AlreadyExists {
                what: "session",
                id: id.to_string(),
            });
        }
        let limit = t.settings.quotas.concurrent_sessions;
        let directory = self.shared.deps.tool_calls.directory();
        if !directory.open_session(tenant, id, limit).await? {
            self.shared.deps.tenants.get(tenant).await?;
            return Err(Error::QuotaExceeded {
                what: "concurrent sessions",
                limit: u64::from(limit),
            });
        }
        let msg = SessionMsg::Create {
            user: user.to_string(),
            persona,
        };
        let seq = self.registry.send(&key, &msg).await?;
        self.registry.wait_handled(&key, seq).await?;
        if !self.registry.state(&key).await?.exists {
            // Its tenant's erasure began in between.
            return Err(Error::NotFound {
                what: "tenant",
                id: tenant.to_string(),
            });
        }
        self.get(tenant, id).await
    }

    /// Session `id` of `tenant`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<SessionInfo> {
        let (_, s) = self.existing(tenant, id).await?;
        Ok(SessionInfo {
            id: id.to_string(),
            user: s.user,
            persona: s.persona.unwrap_or_default(),
            last_event: s.next_event,
            waiting: s.waiting.map(|w| (w.0, w.2)),
            usage: s.usage,
        })
    }

    /// Sends a user message; returns at once with its turn number (the reply streams to
    /// subscribers; [`wait_turn`](Self::wait_turn) waits for it).
    pub async fn send(&self, tenant: &str, id: &str, text: &str) -> Result<u64> {
        let (key, s) = self.existing(tenant, id).await?;
        if s.waiting.is_some() && s.deferred.len() >= MAX_DEFERRED {
            return Err(Error::QuotaExceeded {
                what: "messages waiting for an approval",
                limit: MAX_DEFERRED as u64,
            });
        }
        if text.trim().is_empty() {
            return Err(Error::Invalid("the message is empty".into()));
        }
        if text.len() > MAX_MESSAGE_TEXT {
            return Err(Error::Invalid(format!(
                "the message has {} bytes, more than the limit of {MAX_MESSAGE_TEXT}",
                text.len()
            )));
        }
        let msg = SessionMsg::UserMessage {
            text: text.to_string(),
        };
        Ok(self.registry.send(&key, &msg).await?)
    }

    /// Waits until turn `turn` was handled; returns its events.
    pub async fn wait_turn(&self, tenant: &str, id: &str, turn: u64) -> Result<Vec<SessionEvent>> {
        let key = Self::key(tenant, id)?;
        self.registry.wait_handled(&key, turn).await?;
        let (_, s) = self.existing(tenant, id).await?;
        Ok(s.events.into_iter().filter(|e| e.turn == turn).collect())
    }

    /// The kept events from seq `from` on, at most `limit`.
    pub async fn events(
        &self,
        tenant: &str,
        id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<SessionEvent>> {
        let (_, s) = self.existing(tenant, id).await?;
        Ok(s.events
            .into_iter()
            .filter(|e| e.seq >= from)
            .take(limit)
            .collect())
    }

    /// The kept events from seq `from` on, then live updates.
    pub async fn subscribe(&self, tenant: &str, id: &str, from: u64) -> Result<Subscription> {
        let (key, _) = self.existing(tenant, id).await?;
        // Live first, then the backlog: nothing falls between the two (duplicates are
        // skipped by seq).
        let live = self.shared.hub.receiver(&key);
        let (_, s) = self.existing(tenant, id).await?;
        Ok(Subscription {
            backlog: s.events.into_iter().filter(|e| e.seq >= from).collect(),
            live,
            last: from.checked_sub(1).filter(|l| *l > 0),
            session: id.to_string(),
        })
    }

    /// Cancels the turn running now, if any; true if there was one.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<bool> {
        let (key, _) = self.existing(tenant, id).await?;
        let cancels = self
            .shared
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(cancels.get(&key).is_some_and(|tx| tx.send(true).is_ok()))
    }

    /// Decides what the session's turn waits for (`approval`: a tool call's id or a gate's,
    /// as [`TurnEnd::AwaitingApproval`] names it), then lets the turn go on; returns at once
    /// with the seq of the message that resumes it ([`wait_turn`](Self::wait_turn) with it
    /// waits until the resumed turn, and those queued behind it, ran). Calling it again after
    /// a crash finishes what the first call began.
    pub async fn decide_approval(
        &self,
        tenant: &str,
        id: &str,
        approval: &str,
        approve: bool,
        by: &str,
        comment: &str,
    ) -> Result<u64> {
        let (key, s) = self.existing(tenant, id).await?;
        let Some((_, _, waiting)) = &s.waiting else {
            return Err(Error::NotAwaiting {
                what: "session",
                id: id.to_string(),
            });
        };
        if waiting != approval {
            return Err(Error::NotFound {
                what: "approval",
                id: approval.to_string(),
            });
        }
        let calls = &self.shared.deps.tool_calls;
        let msg = match calls.get(tenant, approval).await {
            Ok(record) if record.session.as_deref() == Some(id) => {
                if matches!(record.status, Some(CallStatus::Awaiting { .. })) {
                    if approve {
                        calls.approve(tenant, approval, by, comment).await?;
                    } else {
                        calls.reject(tenant, approval, by, comment).await?;
                    }
                }
                SessionMsg::Resume
            }
            Ok(_) | Err(Error::NotFound { .. }) => SessionMsg::DecideGate {
                gate: approval.to_string(),
                approval: Approval {
                    approved: approve,
                    by: by.to_string(),
                    comment: comment.to_string(),
                },
            },
            Err(e) => return Err(e),
        };
        Ok(self.registry.send(&key, &msg).await?)
    }

    /// Deletes session `id` of `tenant` and its history.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<()> {
        let key = Self::key(tenant, id)?;
        let before = self.registry.state(&key).await?;
        if !before.exists || !self.shared.deps.tenants.is_live(tenant).await? {
            return Err(Error::NotFound {
                what: "session",
                id: id.to_string(),
            });
        }
        // Deleted already (a delete cut by a crash before its place was freed): free it.
        if !before.deleted {
            let seq = self.registry.send(&key, &SessionMsg::Delete).await?;
            self.registry.wait_handled(&key, seq).await?;
            if !self.registry.state(&key).await?.deleted {
                return Err(Error::Invalid(format!(
                    "session {id:?} could not be deleted (its history could not be erased; see the dead letters)"
                )));
            }
        }
        self.shared
            .deps
            .tool_calls
            .directory()
            .note(tenant, DirectoryMsg::CloseSession(id.to_string()))
            .await?;
        Ok(())
    }
}
