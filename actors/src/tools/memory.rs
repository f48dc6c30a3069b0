//! Long-term memory of a tenant: texts embedded by the embedder pool and kept in vector
//! memory under the tenant's scope, and the two tools over it.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use soma_adapters::{Point, VectorMemory};
use soma_inference::EmbedderPool;

use super::{Invocation, Tool, ToolError, str_arg};
use crate::error::Result;

/// A tenant's long-term memory: embedded texts in vector memory, scoped by tenant.
#[derive(Clone)]
pub struct Memory {
    vectors: Arc<dyn VectorMemory>,
    embedder: Arc<EmbedderPool>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("vectors", &self.vectors)
            .finish_non_exhaustive()
    }
}

/// A text recalled, closest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Recalled {
    /// The memory's id.
    pub id: String,
    /// Its text.
    pub text: String,
    /// Cosine similarity to the query.
    pub score: f32,
}

impl Memory {
    /// Memory over `vectors`, embedding with `embedder` (their dimensions must agree).
    pub fn new(vectors: Arc<dyn VectorMemory>, embedder: Arc<EmbedderPool>) -> Result<Self> {
        if vectors.dimension() != embedder.dimension() {
            return Err(crate::Error::Config(format!(
                "vector memory has dimension {} but the embedder makes {}",
                vectors.dimension(),
                embedder.dimension()
            )));
        }
        Ok(Self { vectors, embedder })
    }

    /// Keeps `text` for `tenant` under `id` (the same id replaces it: a replayed write has
    /// its effect once).
    pub async fn remember(
        &self,
        tenant: &str,
        id: &str,
        text: &str,
        mut payload: Map<String, Value>,
    ) -> Result<()> {
        let vector = self.embedder.embed(text).await?;
        payload.insert("text".into(), json!(text));
        self.vectors
            .upsert(
                tenant,
                vec![Point {
                    id: id.to_string(),
                    vector,
                    payload,
                }],
            )
            .await?;
        metrics::counter!("soma_memory_writes_total").increment(1);
        Ok(())
    }

    /// The `k` texts of `tenant` closest to `query`.
    pub async fn recall(&self, tenant: &str, query: &str, k: usize) -> Result<Vec<Recalled>> {
        let vector = self.embedder.embed(query).await?;
        let hits = self.vectors.search(tenant, &vector, k, None).await?;
        metrics::counter!("soma_memory_reads_total").increment(1);
        Ok(hits
            .into_iter()
            .map(|h| Recalled {
                text: h
                    .payload
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                id: h.id,
                score: h.score,
            })
            .collect())
    }

    /// How many memories `tenant` has.
    pub async fn count(&self, tenant: &str) -> Result<u64> {
        Ok(self.vectors.count(tenant, None).await?)
    }

    /// Erases every memory of `tenant`; returns how many there were.
    pub async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        Ok(self.vectors.erase_tenant(tenant).await?)
    }
}

fn memory_failed(e: crate::Error) -> ToolError {
    ToolError::retryable(format!("memory failed: {e}"))
}

/// `memory.remember {text}`: keeps a text in the tenant's long-term memory.
#[derive(Debug, Clone)]
pub struct RememberTool(pub Memory);

#[async_trait]
impl Tool for RememberTool {
    fn name(&self) -> &str {
        "memory.remember"
    }

    fn description(&self) -> &str {
        "Keeps a fact in long-term memory, to be recalled in later conversations."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": MAX_TEXT}},
            "required": ["text"],
            "additionalProperties": false,
        })
    }

    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let text = str_arg(&call.arguments, "text")?;
        if text.trim().is_empty() {
            return Err(ToolError::invalid("text is empty"));
        }
        let mut payload = Map::new();
        if let Some(s) = &call.session {
            payload.insert("session".into(), json!(s));
        }
        self.0
            .remember(&call.tenant, &call.idempotency_key, text, payload)
            .await
            .map_err(memory_failed)?;
        Ok(json!({"remembered": call.idempotency_key}))
    }
}

/// `memory.recall {query}`: the tenant's memories closest to a query.
#[derive(Debug, Clone)]
pub struct RecallTool(pub Memory);

/// Characters of a remembered text, at most (what the model may generate).
const MAX_TEXT: usize = 200;
/// Characters of a recall query, at most.
const MAX_QUERY: usize = 100;

/// Memories a recall returns.
const RECALL_K: usize = 3;

#[async_trait]
impl Tool for RecallTool {
    fn name(&self) -> &str {
        "memory.recall"
    }

    fn description(&self) -> &str {
        "Finds facts kept in long-term memory that match a query."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": MAX_QUERY}},
            "required": ["query"],
            "additionalProperties": false,
        })
    }

    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let query = str_arg(&call.arguments, "query")?;
        let found = self
            .0
            .recall(&call.tenant, query, RECALL_K)
            .await
            .map_err(memory_failed)?;
        Ok(json!({
            "memories": found
                .iter()
                .map(|r| json!({"text": r.text, "score": r.score}))
                .collect::<Vec<_>>(),
        }))
    }
}
