//! The domain of SomaAgent as durable actors: tenants, sessions, agents, KAMACHIQ projects,
//! tool calls, and each tenant's constitution (Rego policies) gating every action.
//!
//! Built so far: [`Constitution`]s — versioned, content-hashed Rego policies with a JSON data
//! document, compiled once per hash and evaluated in-process with `regorus` into a
//! [`Decision`] (allow, deny with reasons, escalate with reasons) for one documented
//! [`DecisionInput`]; [`Governance`] holds each tenant's current one and swaps it only for
//! one that compiles. [`Tenants`]: each tenant a durable actor (settings, flags, quotas, budget
//! and prices, its constitution, metered usage), deciding by its constitution with a context
//! from its state. Sessions, agents and tool calls as actors are not built yet.

mod audit;
mod constitution;
mod directory;
mod error;
mod forget;
mod project;
mod session;
mod tenant;
mod toolcall;
mod tools;
mod usage;

pub use constitution::{
    Action, Compiled, CompiledCache, Constitution, DEFAULT_DATA, DEFAULT_POLICY, Decision,
    DecisionInput, Governance, Principal, PrincipalKind, Verdict,
};
pub use directory::{DirectoryActor, DirectoryMsg, Listing};
pub use error::{Error, Result};
pub use project::{
    Capsule, CapsuleActor, CapsuleMsg, CapsuleParam, CapsuleVersion, Checked, Compensation,
    Decided, Gate, MAX_ATTEMPTS, MAX_CAPSULE_VERSIONS, MAX_DEPENDENCIES, MAX_GENERATED_TASKS,
    MAX_GOAL, MAX_PARALLEL, MAX_PROJECT_EVENTS, MAX_TASK_TEXT, MAX_TASKS, PROJECT_LIVE_BUFFER,
    ParamType, Phase, Plan, PlanActor, PlanMsg, PlanRequest, ProjectActor, ProjectDeps,
    ProjectEvent, ProjectEventKind, ProjectInfo, ProjectMsg, ProjectOptions, ProjectState,
    ProjectStatus, ProjectSubscription, Projects, RunOutcome, TaskInfo, TaskKind, TaskRetry,
    TaskSpec,
};
pub use session::{
    Approval, ErasureReport, EventKind, HISTORY_ENTRIES, LIVE_BUFFER, MAX_DEFERRED,
    MAX_EVENT_BYTES, MAX_EVENT_TEXT, MAX_EVENTS, MAX_MESSAGE_TEXT, Persona, SessionActor,
    SessionDeps, SessionEvent, SessionInfo, SessionMsg, SessionState, Sessions, Subscription,
    TOOL_STEP_MARGIN, TOOL_STEP_TOKENS, ToolUse, TurnEnd, Update,
};
pub use tenant::{
    ModelUsage, Price, Quotas, Snapshot, Tenant, TenantActor, TenantMsg, TenantSettings,
    TenantState, Tenants, UsageReport, check_id,
};
pub use toolcall::{
    AuditEntry, CallRequest, CallStatus, MAX_CALL_ID, RetryPolicy, ToolCallActor, ToolCallMsg,
    ToolCallRecord, ToolCallState, ToolCalls, check_call_id,
};
pub use tools::{
    HttpLimits, HttpRequestTool, Invocation, Memory, RecallTool, Recalled, RememberTool, Tool,
    ToolError, ToolErrorKind, ToolRegistry,
};
pub use usage::{DayUsage, USAGE_RETENTION_DAYS, UsageActor, UsageMsg};
