//! Erasing a tenant and everything it has.
//!
//! The order is what makes it complete while the tenant is in use:
//! 1. the tenant is marked as being erased (durably): from then on every API and every
//!    decision says "not found", so no new session, turn, tool call, memory write or usage
//!    record begins; a session created, a call run or usage recorded once the mark is down
//!    writes nothing;
//! 2. every session key of the tenant (listed from the registry: committed or pending) gets
//!    an erase, handled after whatever the session was doing or had queued, so no turn
//!    writes after it;
//! 3. then every tool call the same way (after the sessions, so the calls their turns made
//!    are listed), which also waits for a `memory.remember` in flight;
//! 4. then histories, long-term memory, usage by day (and its retention timers), the
//!    open-session directory, and the dead letters of every registry under the tenant;
//! 5. one `tenant.erase` audit event; long-term memory once more (a write a timed-out tool
//!    left running on the blocking pool); the journal's active inbox segment closed and the
//!    journal flushed, so the erased messages leave the disk; then, last, the tenant itself.
//!
//! Cut by a crash anywhere, running it again finishes it: the mark stays until the very
//! last step.

use super::{SessionMsg, Sessions};
use crate::error::{Error, Result};
use crate::forget::forget_keys;
use crate::tenant::check_id;
use crate::toolcall::now_ms;

/// What an erasure removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErasureReport {
    /// Sessions.
    pub sessions: u64,
    /// Tool calls.
    pub tool_calls: u64,
    /// Entries of episodic memory (histories).
    pub history_entries: u64,
    /// Entries of long-term (vector) memory.
    pub memories: u64,
    /// Days of usage by user and session.
    pub usage_days: u64,
}

impl Sessions {
    /// Sessions of `tenant` that hold something, whatever their state (for checking an
    /// erasure).
    pub async fn stored_sessions(&self, tenant: &str) -> Result<usize> {
        check_id(tenant)?;
        let mut n = 0;
        for key in self.registry.keys(&format!("{tenant}/")).await? {
            if self.registry.state(&key).await? != super::SessionState::default() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Erases tenant `tenant` and everything it has: its sessions and their histories, its
    /// tool calls, its long-term memory, its usage, its settings and constitution, and the
    /// dead letters of all of them; then publishes one `tenant.erase` audit event saying so.
    /// Safe while the tenant is in use (see the module's documentation); run again after a
    /// crash, it finishes.
    pub async fn erase_tenant(&self, tenant: &str, by: &str) -> Result<ErasureReport> {
        check_id(tenant)?;
        let deps = &self.shared.deps;
        match deps.tenants.erasing(tenant).await? {
            None => {
                return Err(Error::NotFound {
                    what: "tenant",
                    id: tenant.to_string(),
                });
            }
            Some(false) => deps.tenants.begin_erase(tenant).await?,
            Some(true) => tracing::info!(tenant, "finishing an erasure that was cut"),
        }
        let mut report = ErasureReport::default();
        let prefix = format!("{tenant}/");
        report.sessions =
            forget_keys(&self.registry, &prefix, &SessionMsg::Erase, |s| s.exists).await?;
        report.tool_calls = deps.tool_calls.erase_tenant(tenant).await?;
        report.history_entries = deps.episodic.erase_tenant(tenant).await?;
        if let Some(memory) = &deps.memory {
            report.memories = memory.erase_tenant(tenant).await?;
        }
        report.usage_days = deps.tenants.erase_usage(tenant).await?;
        deps.tool_calls.directory().clear(tenant).await?;
        metrics::counter!("soma_tenant_erasures_total").increment(1);
        tracing::info!(
            tenant,
            by,
            sessions = report.sessions,
            tool_calls = report.tool_calls,
            memories = report.memories,
            "tenant erased"
        );
        let event = soma_adapters::AuditEvent {
            actor: format!("user/{by}"),
            action: "tenant.erase".into(),
            outcome: soma_adapters::Outcome::Succeeded,
            session: None,
            detail: serde_json::json!({
                "sessions": report.sessions,
                "tool_calls": report.tool_calls,
                "history_entries": report.history_entries,
                "memories": report.memories,
                "usage_days": report.usage_days,
            }),
        };
        // Before the tenant goes: a crash in between runs the erasure again, which publishes
        // the event once more rather than never.
        deps.tenants.audit(tenant, &event, now_ms()).await?;
        if let Some(memory) = &deps.memory {
            report.memories += memory.erase_tenant(tenant).await?;
        }
        // Roll, then flush: the closed segment is deleted by a flush once it is handled.
        deps.tool_calls.roll_journal().await?;
        deps.tool_calls.flush().await?;
        // Last: once the tenant is gone, running the erasure again says "not found".
        deps.tenants.erase(tenant).await?;
        deps.tool_calls.flush().await?;
        Ok(report)
    }
}
