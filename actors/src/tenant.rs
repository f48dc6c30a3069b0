//! Tenants as durable actors: settings, feature flags, quotas, budget and prices, the
//! current constitution, and metered usage, keyed by tenant id in registry `tenant`.
//!
//! Every change is a durable message to the tenant's actor; [`Tenants`] waits until it is
//! handled, so what a call returns is what the next read sees. Decisions for a tenant are
//! made by its current constitution with a context built from its state (tokens used today,
//! budget left, whether it is suspended).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use soma_adapters::EventStream;
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};

use crate::audit::Audit;
use crate::constitution::{
    Action, Compiled, CompiledCache, Constitution, DecisionInput, Principal, Verdict,
};
use crate::error::{Error, Result};

use crate::usage::{MS_PER_DAY, USAGE_RETENTION_DAYS, UsageActor, UsageMsg, add_usage};

/// Quotas of a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Sessions open at once.
    pub concurrent_sessions: u32,
    /// Projects running at once.
    pub concurrent_projects: u32,
    /// Requests per minute.
    pub requests_per_minute: u32,
    /// Model tokens (in and out) per UTC day.
    pub tokens_per_day: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            concurrent_sessions: 100,
            concurrent_projects: 10,
            requests_per_minute: 600,
            tokens_per_day: 1_000_000,
        }
    }
}

/// The price of a model, in millionths of the currency per 1,000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per 1,000 tokens in.
    pub input_per_1k_micros: u64,
    /// Per 1,000 tokens out.
    pub output_per_1k_micros: u64,
}

/// A tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantSettings {
    /// Shown to people.
    pub display_name: String,
    /// Feature flags.
    pub flags: BTreeMap<String, bool>,
    /// Quotas.
    pub quotas: Quotas,
    /// Currency of the budget and prices (`EUR`, `USD`, ...).
    pub currency: String,
    /// The budget, in millionths of the currency (0: none).
    pub budget_micros: u64,
    /// Prices by model id.
    pub prices: BTreeMap<String, Price>,
    /// Hosts the `http.request` tool may reach (`api.example.com`, or `*.example.com` for
    /// its subdomains).
    pub allowed_hosts: Vec<String>,
}

/// Tokens and cost of one model on one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ModelUsage {
    /// Tokens in.
    pub tokens_in: u64,
    /// Tokens out.
    pub tokens_out: u64,
    /// Cost, millionths of the currency.
    pub cost_micros: u64,
}

/// A constitution as stored (its data as JSON text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    version: u64,
    policy: String,
    data: String,
}

impl Stored {
    fn of(c: &Constitution) -> Self {
        Self {
            version: c.version,
            policy: c.policy.clone(),
            data: c.data.to_string(),
        }
    }

    fn constitution(&self) -> Constitution {
        Constitution {
            version: self.version,
            policy: self.policy.clone(),
            data: serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A tenant's durable state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TenantState {
    exists: bool,
    settings: TenantSettings,
    suspended: bool,
    constitution: Option<Stored>,
    /// Its erasure has begun: nothing new is accepted, every API says "not found".
    erasing: bool,
    /// Usage by UTC day number, then model (the last `USAGE_RETENTION_DAYS` days).
    usage: BTreeMap<u64, BTreeMap<String, ModelUsage>>,
    spent_micros: u64,
}

impl TenantState {
    /// It exists and its erasure has not begun.
    pub(crate) fn live(&self) -> bool {
        self.exists && !self.erasing
    }

    /// The price of `model` (zero if it has none).
    pub(crate) fn price_of(&self, model: &str) -> Price {
        self.settings.prices.get(model).copied().unwrap_or_default()
    }
}

/// What a tenant looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Its id.
    pub id: String,
    /// Settings.
    pub settings: TenantSettings,
    /// Suspended tenants are denied everything by the default constitution.
    pub suspended: bool,
    /// The current constitution's version and hash.
    pub constitution: Option<(u64, String)>,
    /// Spent so far, millionths of the currency.
    pub spent_micros: u64,
}

/// The tenant actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TenantMsg {
    /// Creates the tenant with the default constitution.
    Create(TenantSettings),
    /// Replaces its settings.
    Update(TenantSettings),
    /// Suspends or resumes it.
    Suspend(bool),
    /// Replaces its constitution (compiled before it was sent).
    SetConstitution {
        /// Its version.
        version: u64,
        /// The Rego source.
        policy: String,
        /// The data document, JSON text.
        data: String,
    },
    /// Forgets the tenant: settings, constitution, usage (only once its erasure began).
    Erase,
    /// Records a model call's tokens at `at_ms`.
    RecordUsage {
        /// The model.
        model: String,
        /// Tokens in.
        tokens_in: u64,
        /// Tokens out.
        tokens_out: u64,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Begins the tenant's erasure: from now on it accepts nothing.
    BeginErase,
}

/// The tenant actor.
#[derive(Debug)]
pub struct TenantActor;

pub(crate) fn cost(price: Price, tokens_in: u64, tokens_out: u64) -> u64 {
    let part = |tokens: u64, per_1k: u64| (u128::from(tokens) * u128::from(per_1k)).div_ceil(1000);
    u64::try_from(
        part(tokens_in, price.input_per_1k_micros) + part(tokens_out, price.output_per_1k_micros),
    )
    .unwrap_or(u64::MAX)
}

impl DurableActor for TenantActor {
    type Msg = TenantMsg;
    type State = TenantState;

    fn init(&self, _key: &str) -> TenantState {
        TenantState::default()
    }

    async fn handle(
        &self,
        _ctx: &mut Context<TenantMsg>,
        s: &mut TenantState,
        msg: TenantMsg,
    ) -> std::result::Result<(), HandlerError> {
        match msg {
            TenantMsg::Create(settings) => {
                if !s.exists {
                    *s = TenantState {
                        exists: true,
                        settings,
                        constitution: Some(Stored::of(&Constitution::default_for_tenant())),
                        ..TenantState::default()
                    };
                }
            }
            _ if !s.exists => {}
            // Only an erasure that began: a late one never erases a tenant created again.
            TenantMsg::Erase if s.erasing => *s = TenantState::default(),
            TenantMsg::Erase => {}
            TenantMsg::BeginErase => s.erasing = true,
            _ if s.erasing => {}
            TenantMsg::Update(settings) => s.settings = settings,
            TenantMsg::Suspend(on) => s.suspended = on,
            TenantMsg::SetConstitution {
                version,
                policy,
                data,
            } => {
                // Versions only rise, whatever order concurrent updates arrive in.
                if s.constitution.as_ref().is_none_or(|c| version > c.version) {
                    s.constitution = Some(Stored {
                        version,
                        policy,
                        data,
                    });
                }
            }
            TenantMsg::RecordUsage {
                model,
                tokens_in,
                tokens_out,
                at_ms,
            } => {
                let u = ModelUsage {
                    tokens_in,
                    tokens_out,
                    cost_micros: cost(s.price_of(&model), tokens_in, tokens_out),
                };
                let day = at_ms / MS_PER_DAY;
                add_usage(
                    s.usage.entry(day).or_default().entry(model).or_default(),
                    &u,
                );
                // Bounded: days past retention are forgotten.
                let oldest = day.saturating_sub(USAGE_RETENTION_DAYS);
                s.usage = s.usage.split_off(&oldest);
                s.spent_micros = s.spent_micros.saturating_add(u.cost_micros);
            }
        }
        Ok(())
    }
}

/// A tenant's state as read once: what a decision and its quotas need.
#[derive(Debug, Clone)]
pub struct Snapshot {
    id: String,
    state: TenantState,
}

impl Snapshot {
    /// The tenant's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its quotas.
    pub fn quotas(&self) -> &Quotas {
        &self.state.settings.quotas
    }
}

/// Usage of a period, per model, user and session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageReport {
    /// Per model.
    pub by_model: BTreeMap<String, ModelUsage>,
    /// Per user (calls whose user is known).
    pub by_user: BTreeMap<String, ModelUsage>,
    /// Per session (calls made in a session).
    pub by_session: BTreeMap<String, ModelUsage>,
    /// Sum over models.
    pub total: ModelUsage,
}

/// The tenants of a runtime.
#[derive(Clone)]
pub struct Tenants {
    registry: Registry<TenantActor>,
    usage: Registry<UsageActor>,
    compiled: Arc<CompiledCache>,
    audit: Audit,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").finish_non_exhaustive()
    }
}

/// Checks an id of the domain (tenant, session, ...): 1-64 of `a-z 0-9 - _`.
pub fn check_id(id: &str) -> Result<()> {
    check_id_upto(id, 64)
}

/// Checks an id of 1-`max` of `a-z 0-9 - _`.
pub(crate) fn check_id_upto(id: &str, max: usize) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= max
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.chars().take(max).collect()))
    }
}

impl Tenants {
    /// The tenants of `rt` (registry `tenant`), publishing nothing.
    pub async fn open(rt: &Runtime) -> Result<Self> {
        Self::open_with_events(rt, None).await
    }

    /// The tenants of `rt`, publishing every decision on `policy.decisions` and
    /// `agent.audit` of `events`.
    pub async fn open_with_events(
        rt: &Runtime,
        events: Option<Arc<dyn EventStream>>,
    ) -> Result<Self> {
        let mut options = RegistryOptions::new("tenant");
        options.passivate_after_ms = Some(60_000);
        let registry = rt.registry(TenantActor, options).await?;
        let mut options = RegistryOptions::new("usage");
        options.passivate_after_ms = Some(60_000);
        let usage = UsageActor {
            tenants: registry.clone(),
        };
        Ok(Self {
            usage: rt.registry(usage, options).await?,
            registry,
            compiled: Arc::default(),
            audit: Audit::new(events),
        })
    }

    async fn apply(&self, id: &str, msg: TenantMsg) -> Result<()> {
        let seq = self.registry.send(id, &msg).await?;
        self.registry.wait_handled(id, seq).await?;
        Ok(())
    }

    async fn existing(&self, id: &str) -> Result<TenantState> {
        check_id(id)?;
        let s = self.registry.state(id).await?;
        if s.live() {
            Ok(s)
        } else {
            Err(Error::NotFound {
                what: "tenant",
                id: id.to_string(),
            })
        }
    }

    /// Whether tenant `id` exists (`Some`), and if so whether its erasure has begun.
    pub(crate) async fn erasing(&self, id: &str) -> Result<Option<bool>> {
        check_id(id)?;
        let s = self.registry.state(id).await?;
        Ok(s.exists.then_some(s.erasing))
    }

    /// Whether tenant `id` exists and its erasure has not begun, read now.
    pub(crate) async fn is_live(&self, id: &str) -> Result<bool> {
        Ok(self.erasing(id).await? == Some(false))
    }

    /// Begins erasing `id`: from when this returns it accepts nothing and every API says
    /// "not found"; work that passed a decision before may still finish.
    pub(crate) async fn begin_erase(&self, id: &str) -> Result<()> {
        self.apply(id, TenantMsg::BeginErase).await
    }

    /// Forgets the usage by day of `id` (once its erasure began); returns how many days.
    pub(crate) async fn erase_usage(&self, id: &str) -> Result<u64> {
        // Each day's retention timer goes with it.
        let prefix = format!("{id}/");
        crate::forget::forget_keys(&self.usage, &prefix, &UsageMsg::Erase, |s| {
            *s != crate::usage::DayUsage::default()
        })
        .await
    }

    /// Forgets tenant `id` (settings, constitution, per-model usage) and its dead letters;
    /// see `Sessions::erase_tenant` for everything else it has.
    pub(crate) async fn erase(&self, id: &str) -> Result<()> {
        check_id(id)?;
        // First: once the tenant is gone, an erasure cannot be run again to finish this.
        self.registry.discard_dead_letters(id).await?;
        self.apply(id, TenantMsg::Erase).await
    }

    /// How many days of per-user and per-session usage are stored for `id`, whatever its
    /// state (for checking an erasure).
    pub async fn stored_usage_days(&self, id: &str) -> Result<usize> {
        check_id(id)?;
        let mut n = 0;
        for key in self.usage.keys(&format!("{id}/")).await? {
            if self.usage.state(&key).await? != crate::usage::DayUsage::default() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Publishes an audit event of tenant `id`.
    pub(crate) async fn audit(
        &self,
        id: &str,
        event: &soma_adapters::AuditEvent,
        at_ms: u64,
    ) -> Result<()> {
        self.audit.event(id, event, at_ms).await
    }

    /// Creates tenant `id` with `settings` and the default constitution.
    pub async fn create(&self, id: &str, settings: TenantSettings) -> Result<Tenant> {
        check_id(id)?;
        if self.registry.state(id).await?.exists {
            return Err(Error::AlreadyExists {
                what: "tenant",
                id: id.to_string(),
            });
        }
        self.apply(id, TenantMsg::Create(settings)).await?;
        tracing::info!(tenant = id, "tenant created");
        self.get(id).await
    }

    /// The tenant `id`.
    pub async fn get(&self, id: &str) -> Result<Tenant> {
        let s = self.existing(id).await?;
        Ok(Tenant {
            id: id.to_string(),
            settings: s.settings,
            suspended: s.suspended,
            constitution: s.constitution.map(|c| {
                let c = c.constitution();
                (c.version, c.hash())
            }),
            spent_micros: s.spent_micros,
        })
    }

    /// Replaces the settings of `id`.
    pub async fn update(&self, id: &str, settings: TenantSettings) -> Result<Tenant> {
        self.existing(id).await?;
        self.apply(id, TenantMsg::Update(settings)).await?;
        self.get(id).await
    }

    /// Suspends (`true`) or resumes `id`.
    pub async fn suspend(&self, id: &str, suspended: bool) -> Result<Tenant> {
        self.existing(id).await?;
        self.apply(id, TenantMsg::Suspend(suspended)).await?;
        tracing::info!(tenant = id, suspended, "tenant suspension changed");
        self.get(id).await
    }

    fn compiled_for(&self, c: &Constitution) -> Result<Arc<Compiled>> {
        self.compiled.get(c)
    }

    /// Makes `c` the constitution of `id` from the next decision on. One that does not
    /// compile is refused with the compiler's message and the current one stays; a version
    /// not above the current one is refused too. Returns the new hash.
    pub async fn set_constitution(&self, id: &str, c: Constitution) -> Result<String> {
        let s = self.existing(id).await?;
        let current = s.constitution.as_ref().map_or(0, |c| c.version);
        if c.version <= current {
            return Err(Error::StaleVersion {
                current,
                given: c.version,
            });
        }
        let compiled = self.compiled_for(&c)?;
        let stored = Stored::of(&c);
        self.apply(
            id,
            TenantMsg::SetConstitution {
                version: stored.version,
                policy: stored.policy,
                data: stored.data,
            },
        )
        .await?;
        let now = self
            .existing(id)
            .await?
            .constitution
            .map_or(0, |c| c.version);
        if now != c.version {
            return Err(Error::StaleVersion {
                current: now,
                given: c.version,
            });
        }
        tracing::info!(tenant = id, version = c.version, constitution = %compiled.hash(), "constitution updated");
        Ok(compiled.hash().to_string())
    }

    /// The current constitution of `id`.
    pub async fn constitution(&self, id: &str) -> Result<Constitution> {
        let s = self.existing(id).await?;
        s.constitution
            .map(|c| c.constitution())
            .ok_or_else(|| Error::NoConstitution(id.to_string()))
    }

    /// Records the tokens of a model call at `at_ms` (cost from the tenant's prices).
    pub async fn record_usage(
        &self,
        id: &str,
        model: &str,
        tokens_in: u64,
        tokens_out: u64,
        at_ms: u64,
    ) -> Result<()> {
        self.record_usage_of(id, model, None, None, tokens_in, tokens_out, at_ms)
            .await
    }

    /// As [`record_usage`](Self::record_usage), for a user and a session.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_usage_of(
        &self,
        id: &str,
        model: &str,
        user: Option<&str>,
        session: Option<&str>,
        tokens_in: u64,
        tokens_out: u64,
        at_ms: u64,
    ) -> Result<()> {
        self.existing(id).await?;
        self.apply(
            id,
            TenantMsg::RecordUsage {
                model: model.to_string(),
                tokens_in,
                tokens_out,
                at_ms,
            },
        )
        .await?;
        if user.is_some() || session.is_some() {
            let msg = UsageMsg::Record {
                model: model.to_string(),
                user: user.map(str::to_string),
                session: session.map(str::to_string),
                tokens_in,
                tokens_out,
            };
            let key = format!("{id}/{}", at_ms / MS_PER_DAY);
            let seq = self.usage.send(&key, &msg).await?;
            self.usage.wait_handled(&key, seq).await?;
        }
        // Counted once recorded: what the metric shows, the next decision sees.
        metrics::counter!("soma_tenant_tokens_total", "tenant" => id.to_string(), "direction" => "in").increment(tokens_in);
        metrics::counter!("soma_tenant_tokens_total", "tenant" => id.to_string(), "direction" => "out").increment(tokens_out);
        Ok(())
    }

    /// Usage of `id` on the UTC days from `from_ms` to `to_ms` (both included).
    pub async fn usage(&self, id: &str, from_ms: u64, to_ms: u64) -> Result<UsageReport> {
        let s = self.existing(id).await?;
        if from_ms > to_ms {
            return Err(Error::InvalidRange { from_ms, to_ms });
        }
        let mut report = UsageReport::default();
        let days = from_ms / MS_PER_DAY..=to_ms / MS_PER_DAY;
        for (day, models) in s.usage.range(days) {
            for (model, u) in models {
                add_usage(report.by_model.entry(model.clone()).or_default(), u);
                add_usage(&mut report.total, u);
            }
            let d = self.usage.state(&format!("{id}/{day}")).await?;
            for (user, u) in &d.by_user {
                add_usage(report.by_user.entry(user.clone()).or_default(), u);
            }
            for (session, u) in &d.by_session {
                add_usage(report.by_session.entry(session.clone()).or_default(), u);
            }
        }
        Ok(report)
    }

    /// The state of `id` as read once, for a decision and its quotas.
    pub async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let state = self.existing(id).await?;
        Ok(Snapshot {
            id: id.to_string(),
            state,
        })
    }

    /// Decides `action` on `resource` by `principal` for tenant `id` at `now_ms`, with the
    /// context from its state: `tokens_today`, `budget_left` (in the currency; infinite
    /// without a budget), `suspended`, `now_ms`.
    pub async fn decide(
        &self,
        id: &str,
        principal: Principal,
        actor: &str,
        action: Action,
        resource: serde_json::Value,
        now_ms: u64,
    ) -> Result<Verdict> {
        let snapshot = self.snapshot(id).await?;
        self.decide_on(&snapshot, principal, actor, action, resource, now_ms)
            .await
    }

    /// As [`decide`](Self::decide), on a state already read. The decision is published (when
    /// the tenants have an event stream) before it is returned.
    pub async fn decide_on(
        &self,
        snapshot: &Snapshot,
        principal: Principal,
        actor: &str,
        action: Action,
        resource: serde_json::Value,
        now_ms: u64,
    ) -> Result<Verdict> {
        let (compiled, input) =
            self.prepare(snapshot, principal, actor, action, resource, now_ms)?;
        let verdict = compiled.decide(&input)?;
        self.audit.decision(&input, &verdict, now_ms).await?;
        Ok(verdict)
    }

    fn prepare(
        &self,
        snapshot: &Snapshot,
        principal: Principal,
        actor: &str,
        action: Action,
        resource: serde_json::Value,
        now_ms: u64,
    ) -> Result<(Arc<Compiled>, DecisionInput)> {
        let (id, s) = (&snapshot.id, &snapshot.state);
        let stored = s
            .constitution
            .as_ref()
            .ok_or_else(|| Error::NoConstitution(id.clone()))?;
        let compiled = self.compiled_for(&stored.constitution())?;
        let today = s.usage.get(&(now_ms / MS_PER_DAY)).map_or(0, |m| {
            m.values().fold(0u64, |n, u| {
                n.saturating_add(u.tokens_in).saturating_add(u.tokens_out)
            })
        });
        let budget_left = if s.settings.budget_micros == 0 {
            f64::MAX
        } else {
            (s.settings.budget_micros as f64 - s.spent_micros as f64) / 1e6
        };
        let input = DecisionInput {
            tenant: id.clone(),
            principal,
            actor: actor.to_string(),
            action,
            resource,
            context: serde_json::json!({
                "tokens_today": today,
                "tokens_per_day": s.settings.quotas.tokens_per_day,
                "budget_left": budget_left,
                "suspended": s.suspended,
                "now_ms": now_ms,
            }),
        };
        Ok((compiled, input))
    }
}
