//! Metered usage per tenant and UTC day by user and by session: a durable actor per tenant
//! and day (registry `usage`, key `tenant/day`), so that no state grows with a tenant's whole
//! history. Per-model totals by day live in the tenant's own state (decisions read them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use soma_supervision::{Context, DurableActor, HandlerError, Registry};

use crate::tenant::{ModelUsage, TenantActor, cost};

/// Days of usage kept: older days are forgotten (the tenant's per-model totals when a newer
/// day is recorded, a day's per-user and per-session usage by a timer).
pub const USAGE_RETENTION_DAYS: u64 = 400;

pub(crate) const MS_PER_DAY: u64 = 86_400_000;

/// One day's usage of a tenant by user and by session.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DayUsage {
    /// Per user (calls whose user is known).
    pub by_user: BTreeMap<String, ModelUsage>,
    /// Per session.
    pub by_session: BTreeMap<String, ModelUsage>,
}

/// The usage actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum UsageMsg {
    /// A model call's tokens (cost from the tenant's prices when it is handled).
    Record {
        /// The model.
        model: String,
        /// The user, if known.
        user: Option<String>,
        /// The session, if any.
        session: Option<String>,
        /// Tokens in.
        tokens_in: u64,
        /// Tokens out.
        tokens_out: u64,
    },
    /// Forgets the day (its tenant is erased, or the day is past retention).
    Erase,
}

/// The usage actor: records a day's usage while its tenant exists and is not being erased.
#[derive(Debug, Clone)]
pub struct UsageActor {
    pub(crate) tenants: Registry<TenantActor>,
}

/// Adds `u` to `acc`, saturating.
pub(crate) fn add_usage(acc: &mut ModelUsage, u: &ModelUsage) {
    acc.tokens_in = acc.tokens_in.saturating_add(u.tokens_in);
    acc.tokens_out = acc.tokens_out.saturating_add(u.tokens_out);
    acc.cost_micros = acc.cost_micros.saturating_add(u.cost_micros);
}

/// The tenant and the UTC day number of a usage key.
pub(crate) fn split_day_key(key: &str) -> Option<(&str, u64)> {
    let (tenant, day) = key.rsplit_once('/')?;
    Some((tenant, day.parse().ok()?))
}

impl DurableActor for UsageActor {
    type Msg = UsageMsg;
    type State = DayUsage;

    fn init(&self, _key: &str) -> DayUsage {
        DayUsage::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<UsageMsg>,
        s: &mut DayUsage,
        msg: UsageMsg,
    ) -> std::result::Result<(), HandlerError> {
        let Some((tenant, day)) = split_day_key(ctx.key()) else {
            return Ok(());
        };
        match msg {
            UsageMsg::Erase => *s = DayUsage::default(),
            UsageMsg::Record {
                model,
                user,
                session,
                tokens_in,
                tokens_out,
            } => {
                // Read when handled: a record that arrives once the tenant's erasure began
                // writes nothing (the erasure lists this key only if it has a state already).
                let t = self
                    .tenants
                    .state(tenant)
                    .await
                    .map_err(HandlerError::new)?;
                if !t.live() {
                    return Ok(());
                }
                let fresh = *s == DayUsage::default();
                let u = ModelUsage {
                    tokens_in,
                    tokens_out,
                    cost_micros: cost(t.price_of(&model), tokens_in, tokens_out),
                };
                if let Some(user) = user {
                    add_usage(s.by_user.entry(user).or_default(), &u);
                }
                if let Some(session) = session {
                    add_usage(s.by_session.entry(session).or_default(), &u);
                }
                if fresh && *s != DayUsage::default() {
                    // The day's first record: the day ends itself once past retention.
                    let end = day
                        .saturating_add(USAGE_RETENTION_DAYS + 1)
                        .saturating_mul(MS_PER_DAY);
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(end);
                    ctx.schedule_at(at, &UsageMsg::Erase)
                        .map_err(HandlerError::new)?;
                }
            }
        }
        Ok(())
    }
}
