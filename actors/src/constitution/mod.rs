//! Constitutions: each tenant's Rego policies and data, compiled once per content hash and
//! evaluated in-process (regorus) into a [`Decision`] for one documented input.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The default constitution's policies (documented rule by rule in `docs/constitution.md`).
pub const DEFAULT_POLICY: &str = include_str!("default.rego");
/// The default constitution's data document.
pub const DEFAULT_DATA: &str = include_str!("default.json");
/// Gathers a constitution's `deny`, `escalate` and `allow` into one result.
const PRELUDE: &str = include_str!("prelude.rego");
const RESULT_RULE: &str = "data.soma.decide.result";
/// Longest one decision may take.
const EVAL_BUDGET: std::time::Duration = std::time::Duration::from_millis(50);

/// A versioned constitution: Rego policies (package `soma`) and a JSON data document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constitution {
    /// Increases with every accepted update of the tenant's constitution.
    pub version: u64,
    /// The Rego source.
    pub policy: String,
    /// The data document (`data` in the policies).
    pub data: serde_json::Value,
}

impl Constitution {
    /// The default constitution, version 1.
    pub fn default_for_tenant() -> Self {
        Self {
            version: 1,
            policy: DEFAULT_POLICY.to_string(),
            data: serde_json::from_str(DEFAULT_DATA).unwrap_or(serde_json::Value::Null),
        }
    }

    /// The sha256 of the policy and the data (canonical JSON), hex: what every decision is
    /// recorded with.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"soma-constitution-1\0");
        h.update((self.policy.len() as u64).to_le_bytes());
        h.update(self.policy.as_bytes());
        h.update(canonical(&self.data).as_bytes());
        hex(&h.finalize())
    }
}

/// `bytes` as lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON text with every object's keys sorted, whatever order the value keeps them in.
fn canonical(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::Value::String(k.clone()),
                        canonical(&o[k])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(a) => {
            format!(
                "[{}]",
                a.iter().map(canonical).collect::<Vec<_>>().join(",")
            )
        }
        other => other.to_string(),
    }
}

/// Who acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A person (through an API key or a token).
    User,
    /// An agent acting for a session.
    Agent,
}

/// The principal of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// User or agent.
    pub kind: PrincipalKind,
    /// Its id within the tenant.
    pub id: String,
    /// Its roles (`admin`, `operator`, `user`, ...).
    #[serde(default)]
    pub roles: Vec<String>,
}

/// What is being done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// A user message enters a session.
    #[serde(rename = "session.message")]
    SessionMessage,
    /// A model generates.
    #[serde(rename = "model.generate")]
    ModelGenerate,
    /// A tool runs.
    #[serde(rename = "tool.call")]
    ToolCall,
    /// Memory is written.
    #[serde(rename = "memory.write")]
    MemoryWrite,
    /// Memory is read.
    #[serde(rename = "memory.read")]
    MemoryRead,
    /// Memory is erased.
    #[serde(rename = "memory.erase")]
    MemoryErase,
    /// A task of a project starts.
    #[serde(rename = "task.start")]
    TaskStart,
}

impl Action {
    /// Its name in policies (`tool.call`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Action::SessionMessage => "session.message",
            Action::ModelGenerate => "model.generate",
            Action::ToolCall => "tool.call",
            Action::MemoryWrite => "memory.write",
            Action::MemoryRead => "memory.read",
            Action::MemoryErase => "memory.erase",
            Action::TaskStart => "task.start",
        }
    }
}

/// The one input document of every decision (`input` in the policies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionInput {
    /// The tenant whose constitution decides.
    pub tenant: String,
    /// Who acts.
    pub principal: Principal,
    /// The actor asking (`session/42`, `tool-call/...`).
    pub actor: String,
    /// What is done.
    pub action: Action,
    /// What it is done to (`{"tool": "http.request", "tenant": "acme", ...}`).
    pub resource: serde_json::Value,
    /// Facts of the moment: `tokens_today`, `budget_left`, `now_ms`, `suspended`.
    pub context: serde_json::Value,
}

/// What the constitution says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refused, with every reason.
    Deny {
        /// Why (sorted).
        reasons: Vec<String>,
    },
    /// Wait for a human approval.
    Escalate {
        /// Why (sorted).
        reasons: Vec<String>,
    },
}

impl Decision {
    /// `allow`, `deny` or `escalate`.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny { .. } => "deny",
            Decision::Escalate { .. } => "escalate",
        }
    }
}

/// A decision and the constitution that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// The constitution's hash.
    pub constitution: String,
    /// Its version.
    pub version: u64,
}

/// A constitution compiled: evaluating it clones a prepared engine (shared, reference
/// counted), sets the input and evaluates one rule.
#[derive(Debug, Clone)]
pub struct Compiled {
    engine: regorus::Engine,
    hash: String,
    version: u64,
}

fn compile_error(e: impl std::fmt::Display) -> Error {
    Error::PolicyCompile {
        message: e.to_string(),
    }
}

impl Compiled {
    /// Parses and compiles `c`; the error carries the Rego compiler's message.
    pub fn compile(c: &Constitution) -> Result<Self> {
        if !c.data.is_object() {
            return Err(Error::PolicyData);
        }
        let mut engine = regorus::Engine::new();
        // A policy that loops or explodes is cut after this and the action denied, rather
        // than stall the caller's thread.
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: EVAL_BUDGET,
            check_interval: std::num::NonZeroU32::MIN.saturating_add(999),
        });
        engine
            .add_policy("constitution.rego".into(), c.policy.clone())
            .map_err(compile_error)?;
        engine
            .add_policy("prelude.rego".into(), PRELUDE.into())
            .map_err(compile_error)?;
        let data = regorus::Value::from_json_str(&c.data.to_string()).map_err(compile_error)?;
        engine.add_data(data).map_err(compile_error)?;
        let mut compiled = Self {
            engine,
            hash: c.hash(),
            version: c.version,
        };
        // Prepares the engine (its rules are scheduled on the first evaluation), and finds
        // what fails to evaluate at all (a rule conflict, an unsafe variable) now rather
        // than at the first real decision.
        let mut warm = compiled.engine.clone();
        warm.set_input(regorus::Value::new_object());
        warm.eval_rule(RESULT_RULE.into()).map_err(compile_error)?;
        compiled.engine = warm;
        Ok(compiled)
    }

    /// The constitution's hash.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Decides `input`. A policy that fails for this input denies (the error says why).
    pub fn decide(&self, input: &DecisionInput) -> Result<Verdict> {
        let started = std::time::Instant::now();
        let mut engine = self.engine.clone();
        engine.set_input(input_value(input));
        let result = engine
            .eval_rule(RESULT_RULE.into())
            .map_err(|e| Error::PolicyEval {
                message: e.to_string(),
            })?;
        let decision = read_result(&result)?;
        metrics::counter!("soma_policy_decisions_total", "decision" => decision.name(), "action" => input.action.name()).increment(1);
        metrics::histogram!("soma_policy_decision_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(tenant = %input.tenant, action = input.action.name(), decision = decision.name(), constitution = %self.hash, "policy decision");
        Ok(Verdict {
            decision,
            constitution: self.hash.clone(),
            version: self.version,
        })
    }
}

/// The input document as the engine's value, built directly (not printed as JSON and parsed
/// again): the same document `serde_json` makes of a [`DecisionInput`].
fn input_value(input: &DecisionInput) -> regorus::Value {
    use regorus::Value as V;
    let mut principal = BTreeMap::new();
    let kind = match input.principal.kind {
        PrincipalKind::User => "user",
        PrincipalKind::Agent => "agent",
    };
    principal.insert(V::from("kind"), V::from(kind));
    principal.insert(V::from("id"), V::from(input.principal.id.as_str()));
    principal.insert(
        V::from("roles"),
        V::from(
            input
                .principal
                .roles
                .iter()
                .map(|r| V::from(r.as_str()))
                .collect::<Vec<_>>(),
        ),
    );
    let mut m = BTreeMap::new();
    m.insert(V::from("tenant"), V::from(input.tenant.as_str()));
    m.insert(V::from("principal"), V::from(principal));
    m.insert(V::from("actor"), V::from(input.actor.as_str()));
    m.insert(V::from("action"), V::from(input.action.name()));
    m.insert(V::from("resource"), json_value(&input.resource));
    m.insert(V::from("context"), json_value(&input.context));
    V::from(m)
}

fn json_value(v: &serde_json::Value) -> regorus::Value {
    use regorus::Value as V;
    match v {
        serde_json::Value::Null => V::Null,
        serde_json::Value::Bool(b) => V::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                V::from(u)
            } else if let Some(i) = n.as_i64() {
                V::from(i)
            } else {
                V::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => V::from(s.as_str()),
        serde_json::Value::Array(a) => V::from(a.iter().map(json_value).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => V::from(
            o.iter()
                .map(|(k, v)| (V::from(k.as_str()), json_value(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

fn strings(v: &regorus::Value, field: &str) -> Result<Vec<String>> {
    let eval = |message: String| Error::PolicyEval { message };
    let value = &v[field];
    let list: Vec<&regorus::Value> = match (value.as_set(), value.as_array()) {
        (Ok(set), _) => set.iter().collect(),
        (_, Ok(array)) => array.iter().collect(),
        _ => return Err(eval(format!("`{field}` is not a set of reasons"))),
    };
    list.into_iter()
        .map(|r| match r.as_string() {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Ok(r.to_string()),
        })
        .collect()
}

fn read_result(v: &regorus::Value) -> Result<Decision> {
    let deny = strings(v, "deny")?;
    if !deny.is_empty() {
        return Ok(Decision::Deny { reasons: deny });
    }
    let escalate = strings(v, "escalate")?;
    if !escalate.is_empty() {
        return Ok(Decision::Escalate { reasons: escalate });
    }
    match v["allow"].as_bool() {
        Ok(true) => Ok(Decision::Allow),
        _ => Ok(Decision::Deny {
            reasons: vec!["no rule allows this action".into()],
        }),
    }
}

/// Compiled constitutions by hash: a hash compiles once, however many tenants share it.
#[derive(Debug, Default)]
pub struct CompiledCache {
    by_hash: Mutex<HashMap<String, Arc<Compiled>>>,
}

impl CompiledCache {
    /// `c` compiled, from the cache or compiled now (and kept).
    pub fn get(&self, c: &Constitution) -> Result<Arc<Compiled>> {
        let hash = c.hash();
        let cached = self
            .by_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .cloned();
        if let Some(done) = cached {
            return Ok(done);
        }
        let fresh = Arc::new(Compiled::compile(c)?);
        self.by_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, fresh.clone());
        Ok(fresh)
    }
}

/// Each tenant's current constitution, and the compiled ones by hash.
#[derive(Debug, Default)]
pub struct Governance {
    current: Mutex<HashMap<String, (Constitution, Arc<Compiled>)>>,
    compiled: CompiledCache,
}

impl Governance {
    /// No tenants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `c` the tenant's constitution from the next decision on; one that does not
    /// compile is refused and the current one stays. Returns its hash.
    pub fn update(&self, tenant: &str, c: Constitution) -> Result<String> {
        let compiled = match self.compiled.get(&c) {
            Ok(done) => done,
            Err(e) => {
                metrics::counter!("soma_policy_rejected_total").increment(1);
                tracing::warn!(tenant, error = %e, "constitution refused; the current one stays");
                return Err(e);
            }
        };
        let hash = compiled.hash().to_string();
        tracing::info!(tenant, version = c.version, constitution = %hash, "constitution updated");
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), (c, compiled));
        Ok(hash)
    }

    /// The tenant's current constitution.
    pub fn current(&self, tenant: &str) -> Option<Constitution> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .map(|(c, _)| c.clone())
    }

    /// Decides `input` by its tenant's current constitution.
    pub fn decide(&self, input: &DecisionInput) -> Result<Verdict> {
        let compiled = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&input.tenant)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| Error::NoConstitution(input.tenant.clone()))?;
        compiled.decide(input)
    }
}

#[cfg(test)]
mod tests;
