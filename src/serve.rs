//! `soma serve`, `soma keys` and `soma config`: one node with embedded defaults and its
//! configuration (a TOML file, then `SOMA_*` environment variables, then flags).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_gateway::{Gateway, GatewayConfig, KeyStore, Models};
use soma_inference::{
    DeviceChoice, EmbedderConfig, EmbedderPool, EmbeddingModel, GenerationModel, GeneratorConfig,
    GeneratorOptions, GeneratorPool,
};

/// Which models to serve and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ModelsConfig {
    /// Folder whose sub-folders are served by name: a GGUF file makes a chat model, a
    /// BERT folder (`config.json`, `model.safetensors`) an embedding model.
    pub(crate) dir: PathBuf,
    /// The pool of each chat model.
    pub(crate) generator: GeneratorConfig,
    /// The pool of each embedding model.
    pub(crate) embedder: EmbedderConfig,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models"),
            generator: GeneratorConfig::default(),
            embedder: EmbedderConfig::default(),
        }
    }
}

/// The whole configuration of `soma serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ServeConfig {
    /// Data directory: the journal (`journal/`) and the API keys (`gateway/keys.json`).
    pub(crate) data: PathBuf,
    /// Address the gateway listens on.
    pub(crate) listen: String,
    /// Models.
    pub(crate) models: ModelsConfig,
    /// Limits of the gateway.
    pub(crate) gateway: GatewayLimits,
    /// Tenants.
    pub(crate) tenants: TenantsConfig,
}

/// Tenants of the node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TenantsConfig {
    /// Settings of a tenant created at its first request (an API key's tenant that does not
    /// exist yet).
    pub(crate) defaults: soma_actors::TenantSettings,
}

/// The gateway's limits (its address is `listen`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct GatewayLimits {
    /// Largest request body, bytes.
    pub(crate) body_limit_bytes: usize,
    /// Longest a request may take until its response starts, seconds.
    pub(crate) request_timeout_secs: u64,
    /// Requests per minute per API key.
    pub(crate) rate_limit_per_minute: u32,
    /// Burst above the steady rate.
    pub(crate) rate_limit_burst: u32,
    /// How long shutdown waits for requests in flight, seconds.
    pub(crate) shutdown_grace_secs: u64,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        let g = GatewayConfig::default();
        Self {
            body_limit_bytes: g.body_limit_bytes,
            request_timeout_secs: g.request_timeout_secs,
            rate_limit_per_minute: g.rate_limit_per_minute,
            rate_limit_burst: g.rate_limit_burst,
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("data"),
            listen: GatewayConfig::default().listen,
            models: ModelsConfig::default(),
            gateway: GatewayLimits::default(),
            tenants: TenantsConfig::default(),
        }
    }
}

/// A configuration error: it names the key and where the value came from.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {key}: {reason}")]
pub(crate) struct ConfigError {
    origin: String,
    key: String,
    reason: String,
}

fn err(
    origin: impl Into<String>,
    key: impl Into<String>,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        origin: origin.into(),
        key: key.into(),
        reason: reason.into(),
    }
}

impl ServeConfig {
    /// The gateway's options.
    pub(crate) fn gateway(&self) -> GatewayConfig {
        GatewayConfig {
            listen: self.listen.clone(),
            body_limit_bytes: self.gateway.body_limit_bytes,
            request_timeout_secs: self.gateway.request_timeout_secs,
            rate_limit_per_minute: self.gateway.rate_limit_per_minute,
            rate_limit_burst: self.gateway.rate_limit_burst,
        }
    }

    /// Checks every value.
    pub(crate) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.gateway().validate().map_err(|e| match e {
            soma_gateway::Error::Config { key, reason } => {
                let key = if key == "gateway.listen" {
                    "listen".into()
                } else {
                    key
                };
                err(origin, key, reason)
            }
            other => err(origin, "gateway", other.to_string()),
        })?;
        for checked in [
            self.models.generator.validate(),
            self.models.embedder.validate(),
        ] {
            if let Err(e) = checked {
                let text = e.to_string();
                let text = text.strip_prefix("configuration: ").unwrap_or(&text);
                let (key, reason) = text.split_once(": ").unwrap_or(("models", text));
                return Err(err(origin, format!("models.{key}"), reason));
            }
        }
        if self.data.as_os_str().is_empty() {
            return Err(err(origin, "data", "must not be empty"));
        }
        Ok(())
    }

    /// The file (if any), then `SOMA_*` variables, then the flags given.
    pub(crate) fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        data: Option<PathBuf>,
        listen: Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut value = toml::Value::try_from(ServeConfig::default())
            .map_err(|e| err("defaults", "-", e.to_string()))?;
        let mut origin = "defaults".to_string();
        if let Some(path) = file {
            origin = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(&origin, "-", format!("cannot read: {e}")))?;
            let parsed: ServeConfig = toml::from_str(&text)
                .map_err(|e| err(&origin, "-", e.to_string().trim().replace('\n', " ")))?;
            value = toml::Value::try_from(parsed).map_err(|e| err(&origin, "-", e.to_string()))?;
        }
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut leaves = Vec::new();
        collect_leaves(&value, String::new(), &mut leaves);
        for (path, current) in leaves {
            let var = format!("SOMA_{}", path.replace('.', "_").to_uppercase());
            let alias = (path == "models.dir").then_some("SOMA_MODELS");
            let found = vars
                .iter()
                .find(|(k, _)| *k == var || Some(k.as_str()) == alias);
            let Some((name, raw)) = found else { continue };
            let parsed = match current {
                toml::Value::Integer(_) => raw
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| format!("{raw:?} is not an integer")),
                toml::Value::Boolean(_) => raw
                    .trim()
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|_| format!("{raw:?} is not true or false")),
                toml::Value::Float(_) => raw
                    .trim()
                    .parse::<f64>()
                    .map(toml::Value::Float)
                    .map_err(|_| format!("{raw:?} is not a number")),
                _ => Ok(toml::Value::String(raw.clone())),
            }
            .map_err(|reason| err(format!("environment variable {name}"), &path, reason))?;
            set_leaf(&mut value, &path, parsed);
        }
        let mut config: ServeConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| err("environment", "-", e.to_string()))?;
        if let Some(d) = data {
            config.data = d;
        }
        if let Some(l) = listen {
            config.listen = l;
        }
        config.validate(&origin)?;
        Ok(config)
    }

    /// The merged configuration as TOML. Nothing in it is secret today (API keys live
    /// hashed in the data directory); a future secret field is printed as `"***"`.
    pub(crate) fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn collect_leaves(v: &toml::Value, at: String, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                collect_leaves(v, path, out);
            }
        }
        other => out.push((at, other.clone())),
    }
}

fn set_leaf(v: &mut toml::Value, path: &str, new: toml::Value) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let Some(t) = cur.as_table_mut() else { return };
        if i + 1 == parts.len() {
            t.insert((*p).to_string(), new);
            return;
        }
        let Some(next) = t.get_mut(*p) else { return };
        cur = next;
    }
}

/// The key store of a data directory.
pub(crate) fn key_store(data: &Path) -> anyhow::Result<KeyStore> {
    Ok(KeyStore::open(data.join("gateway"))?)
}

/// Loads every model under `config.dir` into a pool.
async fn load_models(config: &ModelsConfig) -> anyhow::Result<Models> {
    let mut models = Models::new();
    let entries = std::fs::read_dir(&config.dir).map_err(|e| {
        anyhow::anyhow!(
            "models.dir {}: {e} (run scripts/fetch-models.sh)",
            config.dir.display()
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let gguf = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "gguf"));
        if let Some(file) = gguf {
            let model = tokio::task::spawn_blocking(move || {
                GenerationModel::load(
                    &file,
                    &DeviceChoice::Cpu.device()?,
                    &GeneratorOptions::default(),
                )
            })
            .await??;
            let pool = GeneratorPool::start(model, config.generator.clone()).await?;
            tracing::info!(model = %id, kind = "chat", "model loaded");
            models.add_generator(id, pool);
        } else if dir.join("config.json").exists() && dir.join("model.safetensors").exists() {
            let d = dir.clone();
            let model = tokio::task::spawn_blocking(move || {
                EmbeddingModel::load(&d, &DeviceChoice::Cpu.device()?)
            })
            .await??;
            let pool = EmbedderPool::start(model, config.embedder.clone()).await?;
            tracing::info!(model = %id, kind = "embedding", "model loaded");
            models.add_embedder(id, pool);
        }
    }
    Ok(models)
}

async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs one node until SIGTERM or ctrl-c: journal open, models loaded, gateway up.
pub(crate) async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    soma_inference::check_environment()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    std::fs::create_dir_all(&config.data)
        .map_err(|e| anyhow::anyhow!("data {}: {e}", config.data.display()))?;
    let runtime = soma_supervision::Runtime::open(soma_supervision::RuntimeOptions::new(
        config.data.join("journal"),
    ))
    .await?;
    let models = load_models(&config.models).await?;
    if models.is_empty() {
        anyhow::bail!(
            "no model found under {} (run scripts/fetch-models.sh)",
            config.models.dir.display()
        );
    }
    let keys = Arc::new(key_store(&config.data)?);
    if keys.list()?.is_empty() {
        // A first start: one key, so that the node can be used at once. It is shown here
        // once and stored only as a hash.
        let (record, secret) = keys.create("default", None)?;
        println!(
            "no API key existed: created {} for tenant default (shown once; `soma keys` manages keys):",
            record.id
        );
        println!("{secret}");
    }
    let open = Arc::new(AtomicBool::new(true));
    let flag = open.clone();
    let ready: soma_gateway::Readiness = Arc::new(move || {
        if flag.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err("the journal is closing".into())
        }
    });
    // Decisions and audit events go to the embedded event log under the data directory.
    let events: Arc<dyn soma_adapters::EventStream> =
        Arc::new(soma_adapters::SledLog::open(config.data.join("events"))?);
    let tenants = soma_actors::Tenants::open_with_events(&runtime, Some(events)).await?;
    let governed = soma_gateway::Governed::new(tenants, config.tenants.defaults.clone());
    let gateway = Gateway::start(
        config.gateway(),
        soma_gateway::Services {
            models,
            keys,
            ready,
            metrics: Some(metrics),
            governed: Some(governed),
        },
    )
    .await?;
    println!("listening on http://{}", gateway.local_addr());
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    terminated().await;
    tracing::info!("shutting down");
    open.store(false, Ordering::Release);
    gateway
        .shutdown(Duration::from_secs(config.gateway.shutdown_grace_secs))
        .await?;
    runtime.shutdown().await?;
    println!("stopped");
    Ok(())
}
