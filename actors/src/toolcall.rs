//! Tool calls as durable actors, one per call, keyed `tenant/call-id` in registry
//! `toolcall`: authorized by the tenant's constitution, run with a timeout and retries with
//! backoff, the result (or error) journaled with the call's audit trail.
//!
//! The call id is its idempotency key. The first `Run` of an id decides what the call is;
//! a later `Run` of the same id (a caller replaying after a crash) changes nothing and reads
//! the recorded call. The result is part of the actor's state, committed when the `Run` is
//! acknowledged: a call whose result was journaled never runs again; a run cut by a crash
//! runs again with the same idempotency key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};
use tokio::sync::watch;
use tracing::Instrument;

use crate::constitution::{Action, Decision, Principal};
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::forget::forget_keys;
use crate::tenant::{Tenants, check_id, check_id_upto};
use crate::tools::{Invocation, ToolError, ToolErrorKind, ToolRegistry};

/// What a caller asks a tool call to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRequest {
    /// The tool.
    pub tool: String,
    /// Its arguments, JSON text.
    pub arguments: String,
    /// Who asks.
    pub principal: Principal,
    /// The session it belongs to, if any.
    pub session: Option<String>,
}

/// Where a call stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallStatus {
    /// The constitution escalated: waiting for a human to approve or reject.
    Awaiting {
        /// Why it needs an approval.
        reasons: Vec<String>,
    },
    /// It ran; the result as JSON text.
    Done {
        /// The result.
        result: String,
    },
    /// It ended without a result.
    Failed {
        /// Why.
        error: ToolError,
    },
}

/// One line of a call's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub event: String,
}

/// A tool call's durable state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ToolCallState {
    request: Option<CallRequest>,
    status: Option<CallStatus>,
    attempts: u32,
    audit: Vec<AuditEntry>,
}

/// The tool-call actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToolCallMsg {
    /// Runs the call (once per id).
    Run(CallRequest),
    /// A human approves an escalated call: it runs.
    Approve {
        /// Who decided.
        by: String,
        /// Why.
        comment: String,
    },
    /// A human rejects an escalated call: it fails.
    Reject {
        /// Who decided.
        by: String,
        /// Why.
        comment: String,
    },
    /// Forgets the call (its tenant is erased).
    Erase,
}

/// How failed runs are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Runs at most, the first included.
    pub max_attempts: u32,
    /// The wait before the second run; doubled before each next one.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Per call key, the switch that cancels its run (set before the run starts, it cancels the
/// run as soon as it begins).
type Cancels = Arc<Mutex<HashMap<String, watch::Sender<bool>>>>;

/// Runs `f` on the switch of `key` (made, unset, if there is none).
fn with_switch<T>(cancels: &Cancels, key: &str, f: impl FnOnce(&watch::Sender<bool>) -> T) -> T {
    let mut map = cancels.lock().unwrap_or_else(|p| p.into_inner());
    f(map
        .entry(key.to_string())
        .or_insert_with(|| watch::channel(false).0))
}

/// The tool-call actor.
#[derive(Debug)]
pub struct ToolCallActor {
    tools: Arc<ToolRegistry>,
    tenants: Tenants,
    retry: RetryPolicy,
    cancels: Cancels,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Splits a `tenant/id` key.
pub(crate) fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((key, ""))
}

fn audit(s: &mut ToolCallState, event: String) {
    s.audit.push(AuditEntry {
        at_ms: now_ms(),
        event,
    });
}

impl ToolCallActor {
    /// Runs the recorded request, retrying what may pass, and records how it ended.
    async fn execute(&self, key: &str, s: &mut ToolCallState) {
        let (tenant, id) = split_key(key);
        let Some(req) = s.request.clone() else {
            return;
        };
        let Some(tool) = self.tools.get(&req.tool) else {
            return self.end(s, &req.tool, Err(unknown(&req.tool)), Instant::now());
        };
        let arguments: Value = match serde_json::from_str(&req.arguments) {
            Ok(v) => v,
            Err(e) => {
                let e = ToolError::invalid(format!("the arguments are not JSON: {e}"));
                return self.end(s, &req.tool, Err(e), Instant::now());
            }
        };
        if let Err(e) = self.tools.check(&req.tool, &arguments) {
            return self.end(s, &req.tool, Err(e), Instant::now());
        }
        let started = Instant::now();
        let mut backoff = self.retry.backoff;
        let mut attempt = 0;
        let mut cancel = with_switch(&self.cancels, key, watch::Sender::subscribe);
        let cancelled = || {
            ToolError::new(
                ToolErrorKind::Cancelled,
                "the call was cancelled by its caller",
            )
        };
        let outcome = loop {
            attempt += 1;
            s.attempts += 1;
            let inv = Invocation {
                tenant: tenant.to_string(),
                session: req.session.clone(),
                idempotency_key: format!("{tenant}/{id}"),
                attempt,
                arguments: arguments.clone(),
            };
            if *cancel.borrow_and_update() {
                break Err(cancelled());
            }
            let run = tokio::select! {
                run = tokio::time::timeout(tool.timeout(), tool.run(&inv)) => run,
                _ = cancel.wait_for(|c| *c) => break Err(cancelled()),
            };
            let result = run.unwrap_or_else(|_| {
                Err(ToolError::new(
                    ToolErrorKind::TimedOut,
                    format!("the run took longer than {:?}", tool.timeout()),
                ))
            });
            match result {
                Err(e) if e.kind.retryable() && attempt < self.retry.max_attempts => {
                    tracing::warn!(tenant, call = id, tool = %req.tool, attempt, error = %e, "tool run failed, retrying");
                    audit(s, format!("attempt {attempt} failed: {e}"));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.wait_for(|c| *c) => break Err(cancelled()),
                    }
                    backoff = backoff.saturating_mul(2);
                }
                other => break other,
            }
        };
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.end(s, &req.tool, outcome, started);
    }

    fn end(
        &self,
        s: &mut ToolCallState,
        tool: &str,
        outcome: Result<Value, ToolError>,
        started: Instant,
    ) {
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => kind_label(e.kind),
        };
        metrics::counter!("soma_tool_calls_total", "tool" => tool.to_string(), "outcome" => label)
            .increment(1);
        metrics::histogram!("soma_tool_call_duration_seconds", "tool" => tool.to_string())
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(v) => {
                audit(s, format!("done after {} attempt(s)", s.attempts));
                s.status = Some(CallStatus::Done {
                    result: v.to_string(),
                });
            }
            Err(error) => {
                audit(s, format!("failed: {error}"));
                s.status = Some(CallStatus::Failed { error });
            }
        }
    }
}

fn kind_label(kind: ToolErrorKind) -> &'static str {
    match kind {
        ToolErrorKind::InvalidArguments => "invalid_arguments",
        ToolErrorKind::Retryable => "failed_retryable",
        ToolErrorKind::TimedOut => "timed_out",
        ToolErrorKind::Failed => "failed",
        ToolErrorKind::Denied => "denied",
        ToolErrorKind::Rejected => "rejected",
        ToolErrorKind::UnknownTool => "unknown_tool",
        ToolErrorKind::Cancelled => "cancelled",
    }
}

fn unknown(tool: &str) -> ToolError {
    ToolError::new(ToolErrorKind::UnknownTool, format!("no tool {tool:?}"))
}

impl DurableActor for ToolCallActor {
    type Msg = ToolCallMsg;
    type State = ToolCallState;

    fn init(&self, _key: &str) -> ToolCallState {
        ToolCallState::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<ToolCallMsg>,
        s: &mut ToolCallState,
        msg: ToolCallMsg,
    ) -> std::result::Result<(), HandlerError> {
        let key = ctx.key().to_string();
        let (tenant, id) = split_key(&key);
        let span = tracing::info_span!("tool_call", tenant, call = id);
        self.on(&key, s, msg).instrument(span).await
    }
}

impl ToolCallActor {
    /// Whether `tenant` exists and its erasure has not begun, read now.
    async fn tenant_live(&self, tenant: &str) -> std::result::Result<bool, HandlerError> {
        self.tenants
            .is_live(tenant)
            .await
            .map_err(HandlerError::new)
    }

    async fn on(
        &self,
        key: &str,
        s: &mut ToolCallState,
        msg: ToolCallMsg,
    ) -> std::result::Result<(), HandlerError> {
        let (tenant, id) = split_key(key);
        match msg {
            // A call is what its first request says; a replayed or repeated request of the
            // same id finds it and changes nothing.
            ToolCallMsg::Run(_) if s.request.is_some() => {}
            ToolCallMsg::Run(req) => {
                audit(
                    s,
                    format!(
                        "requested: {} by {:?} {}",
                        req.tool, req.principal.kind, req.principal.id
                    ),
                );
                s.request = Some(req.clone());
                if self.tools.get(&req.tool).is_none() {
                    if !self.tenant_live(tenant).await? {
                        *s = ToolCallState::default();
                        return Ok(());
                    }
                    self.end(s, &req.tool, Err(unknown(&req.tool)), Instant::now());
                    return Ok(());
                }
                let verdict = self
                    .tenants
                    .decide(
                        tenant,
                        req.principal.clone(),
                        &format!("tool-call/{id}"),
                        Action::ToolCall,
                        json!({"tool": req.tool, "tenant": tenant}),
                        now_ms(),
                    )
                    .await;
                match verdict {
                    // No tenant (or one being erased): the call records nothing.
                    Err(Error::NotFound { .. }) => *s = ToolCallState::default(),
                    Err(e @ Error::PolicyEval { .. }) => {
                        let e = ToolError::new(ToolErrorKind::Denied, e.to_string());
                        self.end(s, &req.tool, Err(e), Instant::now());
                    }
                    Err(e) => return Err(HandlerError::new(e)),
                    Ok(v) => {
                        audit(
                            s,
                            format!(
                                "constitution {} (v{}): {}",
                                &v.constitution[..12.min(v.constitution.len())],
                                v.version,
                                v.decision.name()
                            ),
                        );
                        match v.decision {
                            Decision::Allow => self.execute(key, s).await,
                            Decision::Deny { reasons } => {
                                let e = ToolError::new(ToolErrorKind::Denied, reasons.join("; "));
                                self.end(s, &req.tool, Err(e), Instant::now());
                            }
                            Decision::Escalate { reasons } => {
                                s.status = Some(CallStatus::Awaiting { reasons });
                            }
                        }
                    }
                }
            }
            ToolCallMsg::Approve { by, comment } => {
                if matches!(s.status, Some(CallStatus::Awaiting { .. })) {
                    // Read when handled: an approval that lands once the tenant's erasure
                    // began runs nothing (the erasure forgets the call).
                    if !self.tenant_live(tenant).await? {
                        *s = ToolCallState::default();
                        return Ok(());
                    }
                    audit(s, format!("approved by {by}: {comment}"));
                    s.status = None;
                    self.execute(key, s).await;
                }
            }
            ToolCallMsg::Erase => *s = ToolCallState::default(),
            ToolCallMsg::Reject { by, comment } => {
                if matches!(s.status, Some(CallStatus::Awaiting { .. })) {
                    audit(s, format!("rejected by {by}: {comment}"));
                    let tool = s
                        .request
                        .as_ref()
                        .map(|r| r.tool.clone())
                        .unwrap_or_default();
                    let e = ToolError::new(
                        ToolErrorKind::Rejected,
                        format!("rejected by {by}: {comment}"),
                    );
                    self.end(s, &tool, Err(e), Instant::now());
                }
            }
        }
        Ok(())
    }
}

/// Tool-call ids are longer than other ids: an agent's are `session-turn-step`.
pub const MAX_CALL_ID: usize = 128;

/// Checks a tool-call id: 1-[`MAX_CALL_ID`] of `a-z 0-9 - _`.
pub fn check_call_id(id: &str) -> Result<()> {
    check_id_upto(id, MAX_CALL_ID)
}

/// A tool call as read.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallRecord {
    /// Its id (the idempotency key within the tenant).
    pub id: String,
    /// The tool.
    pub tool: String,
    /// The arguments.
    pub arguments: Value,
    /// The session it belongs to.
    pub session: Option<String>,
    /// Where it stands; `None` while it has not ended (running, or about to be).
    pub status: Option<CallStatus>,
    /// Runs so far.
    pub attempts: u32,
    /// Its audit trail, oldest first.
    pub audit: Vec<AuditEntry>,
}

impl ToolCallRecord {
    /// The result, or the error, once it ended; `None` while it waits for an approval.
    pub fn outcome(&self) -> Option<Result<Value, ToolError>> {
        match self.status.as_ref()? {
            CallStatus::Done { result } => {
                Some(Ok(serde_json::from_str(result).unwrap_or(Value::Null)))
            }
            CallStatus::Failed { error } => Some(Err(error.clone())),
            CallStatus::Awaiting { .. } => None,
        }
    }
}

/// The tool calls of a runtime.
#[derive(Clone)]
pub struct ToolCalls {
    registry: Registry<ToolCallActor>,
    tools: Arc<ToolRegistry>,
    runtime: Runtime,
    directory: Directory,
    tenants: Tenants,
    cancels: Cancels,
}

impl std::fmt::Debug for ToolCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolCalls").finish_non_exhaustive()
    }
}

impl ToolCalls {
    /// The tool calls of `rt` (registry `toolcall`), running `tools`, authorized by the
    /// constitutions of `tenants`.
    pub async fn open(
        rt: &Runtime,
        tenants: Tenants,
        tools: Arc<ToolRegistry>,
        retry: RetryPolicy,
    ) -> Result<Self> {
        let mut options = RegistryOptions::new("toolcall");
        options.passivate_after_ms = Some(30_000);
        let directory = Directory::open(rt, tenants.clone()).await?;
        let cancels = Cancels::default();
        let actor = ToolCallActor {
            tools: tools.clone(),
            tenants: tenants.clone(),
            retry,
            cancels: cancels.clone(),
        };
        Ok(Self {
            registry: rt.registry(actor, options).await?,
            tools,
            runtime: rt.clone(),
            directory,
            tenants,
            cancels,
        })
    }

    /// Makes every commit so far durable.
    pub(crate) async fn flush(&self) -> Result<()> {
        Ok(self.runtime.flush().await?)
    }

    /// Closes the journal's active segment (see `Runtime::roll_journal`).
    pub(crate) async fn roll_journal(&self) -> Result<()> {
        Ok(self.runtime.roll_journal().await?)
    }

    pub(crate) fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Forgets every call of `tenant` (after its erasure began: a call run later records
    /// nothing) and their dead letters; returns how many calls held a record. Each erase is
    /// handled after the call's running message, so nothing it does lands afterwards.
    pub(crate) async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        let prefix = format!("{tenant}/");
        forget_keys(&self.registry, &prefix, &ToolCallMsg::Erase, |s| {
            s.request.is_some()
        })
        .await
    }

    /// The dead letters of `tenant`'s calls.
    pub async fn dead_letters(&self, tenant: &str) -> Result<Vec<soma_supervision::DeadLetter>> {
        check_id(tenant)?;
        if !self.tenants.is_live(tenant).await? {
            return Err(Error::NotFound {
                what: "tenant",
                id: tenant.to_string(),
            });
        }
        let prefix = format!("{tenant}/");
        let mut letters = self.registry.dead_letters(None).await?;
        letters.retain(|l| l.key.starts_with(&prefix));
        Ok(letters)
    }

    /// Calls of `tenant` that hold a record, whatever its state (for checking an erasure).
    pub async fn stored_calls(&self, tenant: &str) -> Result<usize> {
        check_id(tenant)?;
        let mut n = 0;
        for key in self.registry.keys(&format!("{tenant}/")).await? {
            if self.registry.state(&key).await?.request.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The tools calls run.
    pub fn tools(&self) -> &Arc<ToolRegistry> {
        &self.tools
    }

    fn key(tenant: &str, id: &str) -> Result<String> {
        check_id(tenant)?;
        check_call_id(id)?;
        Ok(format!("{tenant}/{id}"))
    }

    /// Makes call `id` of `tenant` and waits until it ended (or waits for an approval), its
    /// outcome durable. If the id was used before, nothing runs: what that call recorded is
    /// returned.
    pub async fn call(&self, tenant: &str, id: &str, req: CallRequest) -> Result<ToolCallRecord> {
        let key = Self::key(tenant, id)?;
        self.live_tenant(tenant, id).await?;
        let seq = self.registry.send(&key, &ToolCallMsg::Run(req)).await?;
        self.settle(&key, seq).await?;
        let read = self.read(&key, id).await;
        // Nothing of a tenant whose erasure began meanwhile is returned (and nothing was
        // recorded for a run handled after it began).
        if !self.tenants.is_live(tenant).await? {
            return Err(Error::NotFound {
                what: "tenant",
                id: tenant.to_string(),
            });
        }
        match read {
            // Handled and nothing recorded, its tenant live: the run failed too often (a
            // panic, a crash) and is in the dead letters.
            Err(Error::NotFound { .. }) => Err(Error::DeadLettered {
                what: "tool call",
                id: id.to_string(),
            }),
            other => other,
        }
    }

    /// Waits until message `seq` of `key` is handled and its commit is on disk: what a caller
    /// builds on a call's outcome must not outlive a crash that loses it.
    async fn settle(&self, key: &str, seq: soma_supervision::Seq) -> Result<()> {
        self.registry.wait_handled(key, seq).await?;
        self.runtime.flush().await?;
        Ok(())
    }

    async fn read(&self, key: &str, id: &str) -> Result<ToolCallRecord> {
        let s = self.registry.state(key).await?;
        let Some(req) = s.request else {
            return Err(Error::NotFound {
                what: "tool call",
                id: id.to_string(),
            });
        };
        Ok(ToolCallRecord {
            id: id.to_string(),
            tool: req.tool,
            arguments: serde_json::from_str(&req.arguments).unwrap_or(Value::Null),
            session: req.session,
            status: s.status,
            attempts: s.attempts,
            audit: s.audit,
        })
    }

    /// Call `id` of `tenant`, as recorded so far.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<ToolCallRecord> {
        let key = Self::key(tenant, id)?;
        self.live_tenant(tenant, id).await?;
        self.read(&key, id).await
    }

    /// Nothing of a tenant being erased is found.
    async fn live_tenant(&self, tenant: &str, id: &str) -> Result<()> {
        if self.tenants.is_live(tenant).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "tool call",
                id: id.to_string(),
            })
        }
    }

    async fn resolve(&self, tenant: &str, id: &str, msg: ToolCallMsg) -> Result<ToolCallRecord> {
        let key = Self::key(tenant, id)?;
        self.live_tenant(tenant, id).await?;
        let before = self.read(&key, id).await?;
        if !matches!(before.status, Some(CallStatus::Awaiting { .. })) {
            return Err(Error::NotAwaiting {
                what: "tool call",
                id: id.to_string(),
            });
        }
        let seq = self.registry.send(&key, &msg).await?;
        self.settle(&key, seq).await?;
        self.read(&key, id).await
    }

    /// Cancels call `id` of `tenant` in this process: a run under way stops and the call
    /// fails with [`ToolErrorKind::Cancelled`]; a run that has not begun yet is cancelled as
    /// it begins. A call that ended is not changed. Whoever cancels calls
    /// [`forget_cancel`](Self::forget_cancel) once the call has ended.
    pub fn cancel(&self, tenant: &str, id: &str) -> Result<()> {
        let key = Self::key(tenant, id)?;
        with_switch(&self.cancels, &key, |s| s.send_replace(true));
        Ok(())
    }

    /// Drops the cancel switch of call `id` (after [`cancel`](Self::cancel), once it ended).
    pub fn forget_cancel(&self, tenant: &str, id: &str) {
        if let Ok(key) = Self::key(tenant, id) {
            self.cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
    }

    /// Approves call `id` of `tenant`, which waits for it: it runs now.
    pub async fn approve(
        &self,
        tenant: &str,
        id: &str,
        by: &str,
        comment: &str,
    ) -> Result<ToolCallRecord> {
        let msg = ToolCallMsg::Approve {
            by: by.to_string(),
            comment: comment.to_string(),
        };
        self.resolve(tenant, id, msg).await
    }

    /// Rejects call `id` of `tenant`, which waits for an approval: it fails.
    pub async fn reject(
        &self,
        tenant: &str,
        id: &str,
        by: &str,
        comment: &str,
    ) -> Result<ToolCallRecord> {
        let msg = ToolCallMsg::Reject {
            by: by.to_string(),
            comment: comment.to_string(),
        };
        self.resolve(tenant, id, msg).await
    }
}
