//! The tenant's constitution in front of every model call, and metering after it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::json;
use soma_actors::{
    Action, Decision, Principal as Who, PrincipalKind, Snapshot, TenantSettings, Tenants,
};

use crate::error::ApiError;
use crate::keys::Principal;

/// A tenant's request limiter and the per-minute quota it was made for.
type Limiter = (u32, Arc<DefaultDirectRateLimiter>);

/// Tenants whose constitutions decide the gateway's model calls and whose usage it meters.
/// A key's tenant that does not exist yet is created at its first request with `defaults`.
#[derive(Debug, Clone)]
pub struct Governed {
    tenants: Tenants,
    defaults: TenantSettings,
    /// Each tenant's request limiter, with the per-minute quota it was made for.
    limiters: Arc<Mutex<HashMap<String, Limiter>>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "tenant store failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "tenant_store_failed",
        "the tenant store failed",
    )
}

impl Governed {
    /// Governs by `tenants`; tenants created at first use get `defaults`.
    pub fn new(tenants: Tenants, defaults: TenantSettings) -> Self {
        Self {
            tenants,
            defaults,
            limiters: Arc::default(),
        }
    }

    /// The tenant's state, read once; a tenant that does not exist yet is created with the
    /// defaults.
    async fn ensure(&self, tenant: &str) -> Result<Snapshot, ApiError> {
        match self.tenants.snapshot(tenant).await {
            Ok(t) => Ok(t),
            Err(soma_actors::Error::NotFound { .. }) => {
                match self.tenants.create(tenant, self.defaults.clone()).await {
                    Ok(_) | Err(soma_actors::Error::AlreadyExists { .. }) => {
                        tracing::info!(tenant, "tenant created at its first request");
                        self.tenants.snapshot(tenant).await.map_err(internal)
                    }
                    Err(e) => Err(internal(e)),
                }
            }
            Err(e) => Err(internal(e)),
        }
    }

    /// The tenant's `requests_per_minute` quota (model calls), as a 429 with `Retry-After`.
    fn limit(&self, tenant: &Snapshot) -> Result<(), ApiError> {
        let rpm = tenant.quotas().requests_per_minute;
        let Some(per_minute) = NonZeroU32::new(rpm) else {
            return Ok(());
        };
        let limiter = {
            let mut all = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = || {
                (
                    rpm,
                    Arc::new(RateLimiter::direct(Quota::per_minute(per_minute))),
                )
            };
            let entry = all.entry(tenant.id().to_string()).or_insert_with(fresh);
            if entry.0 != rpm {
                *entry = fresh();
            }
            entry.1.clone()
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("soma_gateway_rate_limited_total", "tenant" => tenant.id().to_string())
                .increment(1);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "tenant_rate_limit_exceeded",
                format!("the tenant's quota of {rpm} model calls per minute is reached"),
            )
            .retry_after(wait.as_secs_f64().ceil().max(1.0) as u64)
        })
    }

    /// Asks the tenant's constitution whether `principal` may run `model` (a `model.generate`
    /// decision): a deny is a 403 `policy_denied`, an escalation a 403 `approval_required`
    /// (durable approvals are not built yet), both naming the reasons.
    pub(crate) async fn admit(
        &self,
        principal: &Principal,
        model: &str,
        kind: &str,
    ) -> Result<(), ApiError> {
        let tenant = self.ensure(&principal.tenant).await?;
        self.limit(&tenant)?;
        let who = Who {
            kind: PrincipalKind::User,
            id: principal.key_id.clone(),
            roles: Vec::new(),
        };
        let verdict = self
            .tenants
            .decide_on(
                &tenant,
                who,
                "gateway",
                Action::ModelGenerate,
                json!({"model": model, "kind": kind, "tenant": principal.tenant}),
                now_ms(),
            )
            .await
            .map_err(|e| match e {
                soma_actors::Error::PolicyEval { message } => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "policy_failed",
                    format!("the tenant's constitution could not decide: {message}"),
                ),
                other => internal(other),
            })?;
        match verdict.decision {
            Decision::Allow => Ok(()),
            Decision::Deny { reasons } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "policy_denied",
                format!(
                    "denied by the tenant's constitution: {}",
                    reasons.join("; ")
                ),
            )),
            Decision::Escalate { reasons } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "approval_required",
                format!(
                    "the tenant's constitution asks for a human approval: {}",
                    reasons.join("; ")
                ),
            )),
        }
    }

    /// Meters a model call's tokens for the tenant.
    pub(crate) async fn record(
        &self,
        principal: &Principal,
        model: &str,
        tokens_in: usize,
        tokens_out: usize,
    ) {
        if let Err(e) = self
            .tenants
            .record_usage(
                &principal.tenant,
                model,
                tokens_in as u64,
                tokens_out as u64,
                now_ms(),
            )
            .await
        {
            tracing::error!(tenant = %principal.tenant, error = %e, "usage not recorded");
        }
    }
}
