//! Capsules: a plan with parameters saved as a reusable, versioned template per tenant
//! (registry `capsule`, key `tenant/name`). Creating a capsule of an existing name adds a
//! version; old versions stay readable and instantiable.
//!
//! A template is a plan whose strings may hold `{{params.<name>}}`: a string that is exactly
//! one such reference becomes the argument's JSON value, anywhere else its text. Arguments
//! are checked against the declared parameters (unknown, missing and mistyped ones are
//! errors naming the parameter); a capsule is refused at creation unless its template, filled
//! with the defaults or a sample value of each type, is a valid plan.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use soma_supervision::{Context, DurableActor, HandlerError};

use super::api::{ProjectInfo, Projects};
use super::plan::Plan;
use crate::error::{Error, Result};
use crate::tenant::check_id;
use crate::toolcall::now_ms;

/// Versions of one capsule, at most.
pub const MAX_CAPSULE_VERSIONS: usize = 100;

/// The type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// A JSON string.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// true or false.
    Boolean,
}

/// A parameter of a capsule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapsuleParam {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Its value when an instantiation gives none (a parameter without one is required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A capsule: parameters and a plan template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capsule {
    /// What it does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Its parameters by name (ids: 1-64 of `a-z 0-9 - _`).
    #[serde(default)]
    pub params: BTreeMap<String, CapsuleParam>,
    /// The plan, with `{{params.<name>}}` in its strings.
    pub plan: Value,
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsuleVersion {
    /// 1, 2, 3, ...
    pub version: u32,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
    /// The capsule, as JSON text.
    pub text: String,
}

/// The capsule actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CapsuleMsg {
    /// Adds a version (the next number).
    Add {
        /// The capsule, JSON text.
        text: String,
        /// When.
        at_ms: u64,
    },
}

/// The capsule actor: the versions of one capsule.
#[derive(Debug)]
pub struct CapsuleActor;

impl DurableActor for CapsuleActor {
    type Msg = CapsuleMsg;
    type State = Vec<CapsuleVersion>;

    fn init(&self, _key: &str) -> Vec<CapsuleVersion> {
        Vec::new()
    }

    async fn handle(
        &self,
        _ctx: &mut Context<CapsuleMsg>,
        s: &mut Vec<CapsuleVersion>,
        msg: CapsuleMsg,
    ) -> std::result::Result<(), HandlerError> {
        let CapsuleMsg::Add { text, at_ms } = msg;
        if s.len() < MAX_CAPSULE_VERSIONS {
            s.push(CapsuleVersion {
                version: s.len() as u32 + 1,
                created_ms: at_ms,
                text,
            });
        }
        Ok(())
    }
}

fn bad(name: &str, reason: impl Into<String>) -> Error {
    Error::Invalid(format!("capsule {name:?}: {}", reason.into()))
}

fn type_ok(kind: ParamType, v: &Value) -> bool {
    match kind {
        ParamType::String => v.is_string(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::Number => v.is_number(),
        ParamType::Boolean => v.is_boolean(),
    }
}

fn sample(kind: ParamType) -> Value {
    match kind {
        ParamType::String => json!("sample"),
        ParamType::Integer => json!(1),
        ParamType::Number => json!(1.5),
        ParamType::Boolean => json!(true),
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `v` with `{{params.<name>}}` filled from `args`; an unknown name is an error.
fn fill(v: &Value, args: &Map<String, Value>) -> std::result::Result<Value, String> {
    Ok(match v {
        Value::String(s) => {
            let mut out = String::new();
            let mut rest = s.as_str();
            // Exactly one reference and nothing else: the value itself.
            let single = s.starts_with("{{params.")
                && s.ends_with("}}")
                && s.matches("{{").count() == 1
                && s.matches("}}").count() == 1;
            let mut whole: Option<Value> = None;
            while let Some(at) = rest.find("{{params.") {
                let Some(end) = rest[at..].find("}}") else {
                    return Err(format!("an unclosed {{{{params. in {s:?}"));
                };
                let name = rest[at + 9..at + end].trim();
                let value = args
                    .get(name)
                    .ok_or_else(|| format!("the template uses unknown parameter {name:?}"))?;
                if single {
                    whole = Some(value.clone());
                }
                out.push_str(&rest[..at]);
                out.push_str(&text_of(value));
                rest = &rest[at + end + 2..];
            }
            match whole {
                Some(v) => v,
                None => {
                    out.push_str(rest);
                    Value::String(out)
                }
            }
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| fill(x, args))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), fill(x, args)?)))
                .collect::<std::result::Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

impl Capsule {
    /// The plan for `args`, checked against the parameters.
    pub fn instantiate(&self, name: &str, args: &Map<String, Value>) -> Result<Plan> {
        if let Some(k) = args.keys().find(|k| !self.params.contains_key(*k)) {
            return Err(bad(name, format!("no parameter {k:?}")));
        }
        let mut full = Map::new();
        for (p, spec) in &self.params {
            let v = match (args.get(p), &spec.default) {
                (Some(v), _) | (None, Some(v)) => v.clone(),
                (None, None) => return Err(bad(name, format!("parameter {p:?} is required"))),
            };
            if !type_ok(spec.kind, &v) {
                let kind = format!("{:?}", spec.kind).to_lowercase();
                return Err(bad(
                    name,
                    format!("parameter {p:?} must be of type {kind}, got {v}"),
                ));
            }
            full.insert(p.clone(), v);
        }
        let plan = fill(&self.plan, &full).map_err(|e| bad(name, e))?;
        Plan::from_json(&plan.to_string())
    }

    fn check(&self, name: &str, tools: &crate::tools::ToolRegistry) -> Result<()> {
        for (p, spec) in &self.params {
            check_id(p).map_err(|_| bad(name, format!("parameter name {p:?} is not an id")))?;
            if let Some(d) = &spec.default
                && !type_ok(spec.kind, d)
            {
                return Err(bad(
                    name,
                    format!("the default of {p:?} is not of its type"),
                ));
            }
        }
        let args: Map<String, Value> = self
            .params
            .iter()
            .map(|(p, s)| {
                (
                    p.clone(),
                    s.default.clone().unwrap_or_else(|| sample(s.kind)),
                )
            })
            .collect();
        self.instantiate(name, &args)?.check(tools)?;
        Ok(())
    }
}

impl Projects {
    fn capsule_key(tenant: &str, name: &str) -> Result<String> {
        check_id(tenant)?;
        check_id(name)?;
        Ok(format!("{tenant}/{name}"))
    }

    /// Saves `capsule` as the next version of capsule `name` of `tenant`; returns the version.
    pub async fn create_capsule(&self, tenant: &str, name: &str, capsule: &Capsule) -> Result<u32> {
        let key = Self::capsule_key(tenant, name)?;
        self.shared.deps.tenants.get(tenant).await?;
        capsule.check(name, self.shared.deps.tool_calls.tools())?;
        let before = self.capsules_reg().state(&key).await?.len();
        if before >= MAX_CAPSULE_VERSIONS {
            return Err(bad(
                name,
                format!("{MAX_CAPSULE_VERSIONS} versions exist already"),
            ));
        }
        let text = serde_json::to_string(capsule).map_err(|e| bad(name, e.to_string()))?;
        let reg = self.capsules_reg();
        let seq = reg
            .send(
                &key,
                &CapsuleMsg::Add {
                    text: text.clone(),
                    at_ms: now_ms(),
                },
            )
            .await?;
        reg.wait_handled(&key, seq).await?;
        let versions = reg.state(&key).await?;
        // The version this message made (another create may have come first).
        versions
            .iter()
            .rev()
            .find(|v| v.text == text && v.version as usize > before)
            .map(|v| v.version)
            .ok_or_else(|| {
                bad(
                    name,
                    format!("{MAX_CAPSULE_VERSIONS} versions exist already"),
                )
            })
    }

    /// The capsules of `tenant`: name and newest version.
    pub async fn capsules(&self, tenant: &str) -> Result<Vec<(String, u32)>> {
        check_id(tenant)?;
        let reg = self.capsules_reg();
        let mut out = Vec::new();
        for key in reg.keys(&format!("{tenant}/")).await? {
            let versions = reg.state(&key).await?;
            if let Some(v) = versions.last() {
                out.push((key[tenant.len() + 1..].to_string(), v.version));
            }
        }
        Ok(out)
    }

    /// Version `version` (the newest if `None`) of capsule `name` of `tenant`.
    pub async fn capsule(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<(u32, Capsule)> {
        let key = Self::capsule_key(tenant, name)?;
        let versions = self.capsules_reg().state(&key).await?;
        let v = match version {
            Some(n) => versions.iter().find(|v| v.version == n),
            None => versions.last(),
        }
        .ok_or_else(|| Error::NotFound {
            what: "capsule",
            id: match version {
                Some(n) => format!("{name} v{n}"),
                None => name.to_string(),
            },
        })?;
        let capsule = serde_json::from_str(&v.text).map_err(|e| bad(name, e.to_string()))?;
        Ok((v.version, capsule))
    }

    /// Starts project `id` from version `version` (the newest if `None`) of capsule `name`
    /// with `args`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_from_capsule(
        &self,
        tenant: &str,
        id: &str,
        user: &str,
        goal: &str,
        name: &str,
        version: Option<u32>,
        args: &Map<String, Value>,
    ) -> Result<ProjectInfo> {
        let (_, capsule) = self.capsule(tenant, name, version).await?;
        let plan = capsule.instantiate(name, args)?;
        self.start(tenant, id, user, goal, plan).await
    }
}
