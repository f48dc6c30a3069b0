//! Shared helpers: where the real models are, loaded once per test binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use soma_inference::{EmbeddingModel, GenerationModel, GeneratorOptions};

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

pub(crate) fn minilm_dir() -> PathBuf {
    need(models_dir().join("all-MiniLM-L6-v2"))
}

pub(crate) fn smollm_path() -> PathBuf {
    need(models_dir().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The tests pin candle to one thread (its CPU pool busy-waits); see .cargo/config.toml.
pub(crate) fn check_threads() {
    assert_eq!(
        soma_inference::cpu_threads(),
        1,
        "tests expect CANDLE_NUM_THREADS=1 (set in .cargo/config.toml)"
    );
}

pub(crate) fn embedder() -> EmbeddingModel {
    check_threads();
    EmbeddingModel::load(minilm_dir(), &candle_core::Device::Cpu).expect("load MiniLM")
}

/// SmolLM2 re-quantized to Q8_0, loaded once per test binary and cloned (weights shared).
pub(crate) fn generator() -> GenerationModel {
    static MODEL: OnceLock<GenerationModel> = OnceLock::new();
    check_threads();
    MODEL
        .get_or_init(|| {
            GenerationModel::load(
                smollm_path(),
                &candle_core::Device::Cpu,
                &GeneratorOptions::default(),
            )
            .expect("load SmolLM2")
        })
        .clone()
}
