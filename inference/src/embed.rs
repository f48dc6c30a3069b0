//! The embedding model: a BERT-family encoder from a Hugging Face-layout folder, mean pooling
//! over real tokens and L2 normalisation.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, HiddenAct};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::device::Engine;
use crate::error::{Error, Result};
use crate::native::bert::{self, Encoder};

/// Longest input of the default model, in tokens, when the folder does not say
/// (`sentence_bert_config.json`'s `max_seq_length`).
const DEFAULT_MAX_TOKENS: usize = 256;

enum Backend {
    Candle(BertModel),
    Native(Encoder),
}

/// A loaded embedding model.
pub struct EmbeddingModel {
    backend: Backend,
    engine: Engine,
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation: how long a text really is.
    counting: Tokenizer,
    device: Device,
    dimension: usize,
    max_tokens: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("dir", &self.dir)
            .field("dimension", &self.dimension)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::model(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("not valid JSON: {e}")))
}

impl EmbeddingModel {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`, on the
    /// native engine on the CPU (when it supports the model) and candle's otherwise.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_on(dir, device, Engine::Auto)
    }

    /// As [`load`](Self::load), on the given engine.
    pub fn load_on(dir: impl AsRef<Path>, device: &Device, engine: Engine) -> Result<Self> {
        let dir = dir.as_ref();
        let span = tracing::info_span!("inference.load_embedder", dir = %dir.display());
        let _enter = span.enter();
        let config_path = dir.join("config.json");
        let config: Config = serde_json::from_value(read_json(&config_path)?)
            .map_err(|e| Error::model(&config_path, format!("not a BERT configuration: {e}")))?;
        let max_tokens = match read_json(&dir.join("sentence_bert_config.json")) {
            Ok(v) => v
                .get("max_seq_length")
                .and_then(serde_json::Value::as_u64)
                .map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
            Err(_) => DEFAULT_MAX_TOKENS,
        }
        .min(config.max_position_embeddings);
        let weights_path = dir.join("model.safetensors");
        if !weights_path.is_file() {
            return Err(Error::model(&weights_path, "file not found"));
        }
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| Error::model(&weights_path, format!("not a safetensors file: {e}")))?;
        let engine = engine.resolve(
            device,
            (!matches!(config.hidden_act, HiddenAct::Gelu))
                .then_some("the native embedding engine: activations other than exact GELU"),
        )?;
        let unfit = |e: candle_core::Error| {
            Error::model(&weights_path, format!("does not fit config.json: {e}"))
        };
        let backend = match engine {
            Engine::Native => Backend::Native(
                Encoder::from_tensors(
                    &tensors,
                    bert::Shape {
                        dim: config.hidden_size,
                        heads: config.num_attention_heads,
                        layers: config.num_hidden_layers,
                        ffn: config.intermediate_size,
                        eps: config.layer_norm_eps as f32,
                    },
                )
                .map_err(unfit)?,
            ),
            _ => {
                let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
                Backend::Candle(BertModel::load(vb, &config).map_err(unfit)?)
            }
        };
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::Tokenizer {
                origin: tokenizer_path.display().to_string(),
                detail: e.to_string(),
            })?;
        // The file pads and truncates to a fixed length; pad to the longest in the batch and
        // truncate at the model's maximum instead.
        let pad_id = config.pad_token_id as u32;
        let pad_token = tokenizer
            .id_to_token(pad_id)
            .unwrap_or_else(|| "[PAD]".to_string());
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        let mut counting = tokenizer.clone();
        counting
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                origin: tokenizer_path.display().to_string(),
                detail: e.to_string(),
            })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| Error::Tokenizer {
                origin: tokenizer_path.display().to_string(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            backend,
            engine,
            tokenizer,
            counting,
            device: device.clone(),
            dimension: config.hidden_size,
            max_tokens,
            dir: dir.to_path_buf(),
        })
    }

    /// The engine the model runs on (never `Auto`).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Length of the vectors.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Longest input in tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of `text` as the model sees it (special tokens included, truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                origin: self.dir.join("tokenizer.json").display().to_string(),
                detail: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokens of `text` as the model's tokenizer splits it, special tokens included, before
    /// truncation to [`max_tokens`](Self::max_tokens).
    pub fn token_count(&self, text: &str) -> Result<usize> {
        let enc = self
            .counting
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                origin: self.dir.join("tokenizer.json").display().to_string(),
                detail: e.to_string(),
            })?;
        Ok(enc.len())
    }

    /// One vector per text, in order, for any number of texts: sorted by length and run in
    /// forward passes of `batch` texts, so that texts of like length are padded together
    /// (what sentence-transformers' `encode` does).
    pub fn embed_all(&self, texts: &[String], batch: usize) -> Result<Vec<Vec<f32>>> {
        let batch = batch.max(1);
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(batch) {
            let group: Vec<String> = chunk.iter().map(|&i| texts[i].clone()).collect();
            for (&i, v) in chunk.iter().zip(self.embed(&group)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// One unit-length vector per text, in order; one forward pass for the whole batch.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenizer {
                origin: self.dir.join("tokenizer.json").display().to_string(),
                detail: e.to_string(),
            })?;
        let model = match &self.backend {
            Backend::Native(encoder) => {
                // Right padding: the real tokens are the first `mask`-many.
                let seqs: Vec<&[u32]> = encodings
                    .iter()
                    .map(|e| {
                        let real = e.get_attention_mask().iter().filter(|&&m| m != 0).count();
                        &e.get_ids()[..real]
                    })
                    .collect();
                return encoder.embed(&seqs).map_err(Error::compute);
            }
            Backend::Candle(model) => model,
        };
        let len = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let shape = (texts.len(), len);
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::from_vec(ids, shape, &self.device)?;
            let mask = Tensor::from_vec(mask, shape, &self.device)?;
            let types = ids.zeros_like()?;
            let hidden = model.forward(&ids, &types, Some(&mask))?;
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        run().map_err(Error::compute)
    }
}
