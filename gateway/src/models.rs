//! The models a gateway serves, by id.

use std::collections::BTreeMap;
use std::sync::Arc;

use soma_inference::{EmbedderPool, GeneratorPool};

/// One served model.
#[derive(Debug, Clone)]
pub enum Served {
    /// A chat model (`/v1/chat/completions`).
    Generator(Arc<GeneratorPool>),
    /// An embedding model (`/v1/embeddings`).
    Embedder(Arc<EmbedderPool>),
}

/// The loaded models, by id (the folder name under `models/`).
#[derive(Debug, Clone, Default)]
pub struct Models {
    by_id: BTreeMap<String, Served>,
    /// When they were loaded, seconds since the Unix epoch (OpenAI's `created`).
    pub(crate) created: u64,
}

impl Models {
    /// No models.
    pub fn new() -> Self {
        Self {
            by_id: BTreeMap::new(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Serves `pool` as chat model `id`.
    pub fn add_generator(&mut self, id: impl Into<String>, pool: GeneratorPool) {
        self.by_id
            .insert(id.into(), Served::Generator(Arc::new(pool)));
    }

    /// Serves `pool` as embedding model `id`.
    pub fn add_embedder(&mut self, id: impl Into<String>, pool: EmbedderPool) {
        self.by_id
            .insert(id.into(), Served::Embedder(Arc::new(pool)));
    }

    /// The model `id`.
    pub fn get(&self, id: &str) -> Option<&Served> {
        self.by_id.get(id)
    }

    /// Every model, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Served)> {
        self.by_id.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many models.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
