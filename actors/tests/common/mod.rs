//! A node of the domain for tests: runtime, tenants, tools, tool calls, sessions, memory,
//! with the real models (SmolLM2 for generation, MiniLM for embeddings).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use soma_actors::{
    EventKind, Memory, Persona, RecallTool, RememberTool, RetryPolicy, SessionDeps, SessionEvent,
    Sessions, Tenants, Tool, ToolCalls, ToolRegistry, ToolUse, TurnEnd,
};
use soma_adapters::{EdgeVectors, SledEpisodic, SledLog};
use soma_inference::{
    EmbedderConfig, EmbedderPool, EmbeddingModel, GenerationModel, GeneratorConfig,
    GeneratorOptions, GeneratorPool,
};
use soma_supervision::{Runtime, RuntimeOptions};

/// The models folder: `SOMA_MODELS`, else `models/` at the workspace root.
pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("SOMA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

fn need(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/fetch-models.sh` (CI does)",
        path.display()
    );
    path
}

pub(crate) fn generator() -> GenerationModel {
    static MODEL: OnceLock<GenerationModel> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path =
                need(models_dir().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"));
            GenerationModel::load(
                path,
                &candle_core::Device::Cpu,
                &GeneratorOptions::default(),
            )
            .expect("load SmolLM2")
        })
        .clone()
}

pub(crate) fn embedder() -> EmbeddingModel {
    EmbeddingModel::load(
        need(models_dir().join("all-MiniLM-L6-v2")),
        &candle_core::Device::Cpu,
    )
    .expect("load MiniLM")
}

pub(crate) const MODEL: &str = "smollm";

/// A node over `dir`.
pub(crate) struct Node {
    pub(crate) rt: Runtime,
    pub(crate) tenants: Tenants,
    pub(crate) calls: ToolCalls,
    pub(crate) sessions: Sessions,
    pub(crate) memory: Memory,
    pub(crate) episodic: Arc<SledEpisodic>,
    pub(crate) events: Arc<SledLog>,
}

impl Node {
    /// Opens a node over `dir` with the memory tools and `extra` tools.
    pub(crate) async fn open(dir: &Path, extra: Vec<Arc<dyn Tool>>) -> Node {
        let rt = Runtime::open(RuntimeOptions::new(dir.join("journal")))
            .await
            .unwrap();
        let events = Arc::new(SledLog::open(dir.join("events")).unwrap());
        let tenants = Tenants::open_with_events(&rt, Some(events.clone()))
            .await
            .unwrap();
        let embed = Arc::new(
            EmbedderPool::start(embedder(), EmbedderConfig::default())
                .await
                .unwrap(),
        );
        let vectors = Arc::new(
            EdgeVectors::open(dir.join("vectors"), embed.dimension())
                .await
                .unwrap(),
        );
        let memory = Memory::new(vectors, embed).unwrap();
        let mut tools = ToolRegistry::new();
        tools.register(RememberTool(memory.clone())).unwrap();
        tools.register(RecallTool(memory.clone())).unwrap();
        for t in extra {
            tools.register_arc(t).unwrap();
        }
        let calls = ToolCalls::open(
            &rt,
            tenants.clone(),
            Arc::new(tools),
            RetryPolicy::default(),
        )
        .await
        .unwrap();
        let episodic = Arc::new(SledEpisodic::open(dir.join("episodic")).unwrap());
        let pool = GeneratorPool::start(
            generator(),
            GeneratorConfig {
                replicas: 1,
                ..GeneratorConfig::default()
            },
        )
        .await
        .unwrap();
        let mut generators = BTreeMap::new();
        generators.insert(MODEL.to_string(), Arc::new(pool));
        let sessions = Sessions::open(
            &rt,
            SessionDeps {
                tenants: tenants.clone(),
                tool_calls: calls.clone(),
                memory: Some(memory.clone()),
                episodic: episodic.clone(),
                generators,
            },
        )
        .await
        .unwrap();
        Node {
            rt,
            tenants,
            calls,
            sessions,
            memory,
            episodic,
            events,
        }
    }
}

/// A persona of the test model with `tools`, one tool step, 24 tokens a turn.
pub(crate) fn persona(tools: &[&str]) -> Persona {
    Persona {
        model: MODEL.into(),
        tools: tools.iter().map(|t| t.to_string()).collect(),
        tool_use: ToolUse::FirstStep,
        max_steps: 1,
        max_tokens_per_turn: 24,
        system_prompt: "You are a helpful assistant with a long-term memory.".into(),
        ..Persona::default()
    }
}

/// How the turn whose events are `events` ended.
pub(crate) fn ended(events: &[SessionEvent]) -> TurnEnd {
    events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::TurnEnded { end } => Some(end.clone()),
            _ => None,
        })
        .expect("the turn ended")
}
