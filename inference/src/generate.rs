//! The generation model: a quantized llama-family GGUF, its tokenizer and chat template, and
//! the decode loop (sampling, stop sequences, streaming text, structured output).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use serde::{Deserialize, Serialize};

use crate::device::Engine;
use crate::error::{Error, Result};
use crate::gguf::{self, Quantization, TextTokenizer};
use crate::native;
use crate::sample::{Sampler, SamplingParams};
use crate::schema::{JsonSchema, Matcher, MatcherState};

/// How to load a generation model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorOptions {
    /// Which implementation runs the model.
    pub engine: Engine,
    /// What to do with Q4_1 weights at load (default: as stored on the native engine,
    /// re-quantized to Q8_0 on candle's).
    pub quantization: Quantization,
    /// A `tokenizer.json` to use instead of the GGUF's own tokenizer metadata, with the id
    /// of its end-of-sequence token.
    pub tokenizer: Option<(PathBuf, u32)>,
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What to continue: raw text, or a chat rendered with the model's own template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Text continued as is.
    Text(String),
    /// Messages rendered by the model's chat template, with the assistant turn opened.
    Chat(Vec<ChatMessage>),
}

/// A generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// When set, the output is constrained to JSON valid against this schema.
    pub schema: Option<serde_json::Value>,
    /// The tenant it is for: the batch queue is fair between tenants, and tokens are
    /// counted per tenant.
    pub tenant: Option<String>,
}

impl GenerateRequest {
    /// A request with default parameters.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            params: SamplingParams::default(),
            schema: None,
            tenant: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its output (or the structured value was complete).
    Stop,
    /// A stop sequence was reached.
    StopSequence,
    /// `max_tokens` was reached.
    Length,
    /// The requester went away.
    Cancelled,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt (after the chat template).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// The end of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The whole output text (stop sequence excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// For structured output: the parsed value (valid against the schema).
    pub json: Option<serde_json::Value>,
}

/// What a generation stream yields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationEvent {
    /// A generated token and the text it completes (may be empty while a multi-byte
    /// character or a possible stop sequence is held back).
    Token {
        /// Token id.
        id: u32,
        /// New text.
        text: String,
    },
    /// Text released at the end that earlier tokens held back.
    Text {
        /// The text.
        text: String,
    },
    /// The last event.
    Done(Completion),
}

/// A request checked against the model, ready to run.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) tokens: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) schema: Option<Arc<JsonSchema>>,
}

/// The implementation behind a model.
#[derive(Clone)]
enum Backend {
    Candle(ModelWeights),
    Native(native::Model),
}

/// A loaded generation model. Cloning is cheap (weights are shared); each clone has its own
/// key-value cache.
#[derive(Clone)]
pub struct GenerationModel {
    backend: Backend,
    engine: Engine,
    /// The tokens in the cache after `next_token_logits` (empty after a generation).
    scored: Vec<u32>,
    tokenizer: Arc<TextTokenizer>,
    /// The chat template, compiled once at load.
    template: Option<Arc<minijinja::Environment<'static>>>,
    /// Marks a message's text in a rendered chat (private-use characters and a per-load
    /// nonce: no text a client sends contains it by chance).
    marker: Arc<str>,
    context_length: usize,
    path: PathBuf,
    device: Device,
}

fn compile_template(path: &Path, source: String) -> Result<Arc<minijinja::Environment<'static>>> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", source)
        .map_err(|e| Error::model(path, format!("chat template: {e}")))?;
    Ok(Arc::new(env))
}

impl std::fmt::Debug for GenerationModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationModel")
            .field("path", &self.path)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl GenerationModel {
    /// Loads a llama-family GGUF file.
    pub fn load(
        path: impl AsRef<Path>,
        device: &Device,
        options: &GeneratorOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let span = tracing::info_span!("inference.load_generator", path = %path.display());
        let _enter = span.enter();
        let started = std::time::Instant::now();
        let engine = options.engine.resolve(device, None)?;
        let quantization = match (options.quantization, engine) {
            (Quantization::Auto, Engine::Candle) => Quantization::Q8_0,
            (q, _) => q,
        };
        let gguf::Loaded {
            content,
            mut bytes,
            context_length,
            requantized,
        } = gguf::load(path, quantization)?;
        let tokenizer = match &options.tokenizer {
            Some((file, eos)) => TextTokenizer::from_file(file, *eos)?,
            None => TextTokenizer::from_gguf(&content, path)?,
        };
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
            .map(|source| compile_template(path, source))
            .transpose()?;
        let marker: Arc<str> = Arc::from(format!("\u{E000}soma{:016x}\u{E001}", fastrand::u64(..)));
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .unwrap_or(0);
        if vocab != tokenizer.vocab_size() {
            return Err(Error::model(
                path,
                format!(
                    "the embedding has {vocab} rows but the tokenizer has {} tokens",
                    tokenizer.vocab_size()
                ),
            ));
        }
        let unusable =
            |e: candle_core::Error| Error::model(path, format!("not a usable llama model: {e}"));
        let backend = match engine {
            Engine::Native => Backend::Native(native::Model::new(Arc::new(
                native::Weights::from_gguf(&content, &mut bytes).map_err(unusable)?,
            ))),
            _ => Backend::Candle(
                ModelWeights::from_gguf(content, &mut bytes, device).map_err(unusable)?,
            ),
        };
        tracing::info!(
            path = %path.display(),
            engine = ?engine,
            requantized,
            context = context_length,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "generator model loaded"
        );
        Ok(Self {
            backend,
            engine,
            scored: Vec::new(),
            tokenizer: Arc::new(tokenizer),
            template,
            marker,
            context_length,
            path: path.to_path_buf(),
            device: device.clone(),
        })
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The file the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The prompt text a chat renders to, by the model's own template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let env = self.template.as_deref().ok_or_else(|| {
            Error::InvalidRequest("the model has no chat template: send a text prompt".into())
        })?;
        if messages.is_empty() {
            return Err(Error::InvalidRequest(
                "a chat needs at least one message".into(),
            ));
        }
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::model(&self.path, format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
        })
        .map_err(|e| Error::InvalidRequest(format!("chat template refused the messages: {e}")))
    }

    /// The prompt tokens of a chat: the template's own text with its control tokens, each
    /// message's text with none (`<|im_end|>` typed by a user stays text).
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                ChatMessage::new(m.role.clone(), format!("{}{i}{}", self.marker, self.marker))
            })
            .collect();
        let rendered = self.render_chat(&marked)?;
        let mut tokens = Vec::new();
        let mut parts = rendered.split(&*self.marker);
        let head = parts.next().unwrap_or_default();
        tokens.extend(self.tokenizer.encode(head)?);
        loop {
            let (index, after) = match (parts.next(), parts.next()) {
                (Some(index), Some(after)) => (index, after),
                (None, _) => break,
                (Some(_), None) => {
                    return Err(Error::InvalidRequest(
                        "the chat template changed a message's text".into(),
                    ));
                }
            };
            let i: usize = index.parse().map_err(|_| {
                Error::InvalidRequest("the chat template changed a message's text".into())
            })?;
            let text = &messages
                .get(i)
                .ok_or_else(|| {
                    Error::InvalidRequest("the chat template changed a message's text".into())
                })?
                .content;
            tokens.extend(self.tokenizer.encode_plain(text)?);
            tokens.extend(self.tokenizer.encode_template(after)?);
        }
        Ok(tokens)
    }

    /// Checks a request and tokenizes its prompt.
    pub(crate) fn prepare(&self, req: GenerateRequest) -> Result<Prepared> {
        req.params.validate()?;
        let tokens = match &req.prompt {
            Prompt::Text(t) if t.is_empty() => {
                return Err(Error::InvalidRequest("the prompt is empty".into()));
            }
            Prompt::Text(t) => self.tokenizer.encode(t)?,
            Prompt::Chat(m) => self.chat_tokens(m)?,
        };
        let schema = req
            .schema
            .as_ref()
            .map(JsonSchema::compile)
            .transpose()?
            .map(Arc::new);
        if schema.is_some() && !req.params.stop.is_empty() {
            return Err(Error::InvalidRequest(
                "stop sequences cannot be combined with a schema".into(),
            ));
        }
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("the prompt has no tokens".into()));
        }
        if tokens.len().saturating_add(req.params.max_tokens) > self.context_length {
            return Err(Error::InvalidRequest(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens",
                tokens.len(),
                req.params.max_tokens,
                self.context_length
            )));
        }
        Ok(Prepared {
            tokens,
            params: req.params,
            schema,
        })
    }

    /// The token ids of `text` as the model reads it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }

    /// The model's scores for the token after `tokens` (one per vocabulary entry): for
    /// ranking continuations and for comparing engines. When `tokens` extends the previous
    /// call's, only the new tokens are computed.
    pub fn next_token_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to score".into()));
        }
        if tokens.len() > self.context_length {
            return Err(Error::InvalidRequest(format!(
                "{} tokens exceed the context of {} tokens",
                tokens.len(),
                self.context_length
            )));
        }
        let cached = std::mem::take(&mut self.scored);
        let logits = if tokens.len() > cached.len() && tokens.starts_with(&cached) {
            self.forward(&tokens[cached.len()..], cached.len())
        } else {
            self.clear_cache();
            self.forward(tokens, 0)
        }?;
        self.scored = tokens.to_vec();
        Ok(logits)
    }

    fn clear_cache(&mut self) {
        self.scored.clear();
        match &mut self.backend {
            Backend::Native(m) => m.clear(),
            Backend::Candle(w) => w.clear_kv_cache(),
        }
    }

    /// The engine the model runs on (never `Auto`).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let weights = match &mut self.backend {
            Backend::Native(m) => return m.forward(tokens, pos).map_err(Error::compute),
            Backend::Candle(w) => w,
        };
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(Error::compute)?;
        let logits = weights.forward(&input, pos).map_err(Error::compute)?;
        logits
            .squeeze(0)
            .and_then(|l| l.to_dtype(candle_core::DType::F32))
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(Error::compute)
    }

    /// Generates for `req` from an empty cache, calling `emit` with each event; `emit`
    /// returning false (the reader is gone) cancels. Checks `stopped` between tokens.
    pub(crate) fn run(
        &mut self,
        req: &Prepared,
        stopped: &AtomicBool,
        emit: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<Completion> {
        self.clear_cache();
        let mut decoder = Decoder::new(req);
        let mut logits = self.forward(&req.tokens, 0)?;
        let mut pos = req.tokens.len();
        loop {
            if stopped.load(Ordering::Relaxed) {
                return Err(Error::Compute("the replica is stopping".into()));
            }
            match decoder.step(&self.tokenizer, &mut logits, emit)? {
                Some(next) => {
                    logits = self.forward(&[next], pos)?;
                    pos += 1;
                }
                None => return decoder.finish(emit),
            }
        }
    }

    /// The tokenizer, shared.
    pub(crate) fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// The native engine's weights, if the model runs on it (what the batch scheduler runs).
    pub(crate) fn native_weights(&self) -> Option<Arc<native::Weights>> {
        match &self.backend {
            Backend::Native(m) => Some(m.weights().clone()),
            Backend::Candle(_) => None,
        }
    }
}

/// The decoding of one generation, token by token: sampling (under the schema, if any), stop
/// sequences, text streamed as it becomes safe to show, the finish reason. The model runs
/// elsewhere: [`Decoder::step`] takes the logits after the last token and says which token
/// to run next.
pub(crate) struct Decoder {
    sampler: Sampler,
    /// The schema and where the output is in it.
    matcher: Option<(Arc<JsonSchema>, MatcherState)>,
    params: SamplingParams,
    prompt_tokens: usize,
    out: Vec<u8>,
    emitted: usize,
    generated: usize,
    max_stop: usize,
    finish: Option<FinishReason>,
}

impl Decoder {
    pub(crate) fn new(req: &Prepared) -> Self {
        Self {
            sampler: Sampler::new(&req.params),
            matcher: req
                .schema
                .as_ref()
                .map(|s| (s.clone(), s.matcher().suspend())),
            params: req.params.clone(),
            prompt_tokens: req.tokens.len(),
            out: Vec::new(),
            emitted: 0,
            generated: 0,
            max_stop: req.params.stop.iter().map(String::len).max().unwrap_or(0),
            finish: None,
        }
    }

    /// Picks the token after `logits` and emits what it adds; `Some(token)` to run it and
    /// continue, `None` when the generation is over (see [`Decoder::finish`]).
    pub(crate) fn step(
        &mut self,
        tok: &TextTokenizer,
        logits: &mut Vec<f32>,
        emit: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.generated >= self.params.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        logits.truncate(tok.vocab_size());
        let (schema, state) = self.matcher.take().unzip();
        let mut resumed = schema.as_deref().zip(state).map(|(s, st)| s.resume(st));
        let stepped = self.pick_and_emit(tok, logits, resumed.as_mut(), emit);
        let state = resumed.map(Matcher::suspend);
        self.matcher = schema.zip(state);
        stepped
    }

    fn pick_and_emit(
        &mut self,
        tok: &TextTokenizer,
        logits: &mut [f32],
        mut matcher: Option<&mut Matcher<'_>>,
        emit: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<Option<u32>> {
        let next = match matcher.as_deref() {
            None => self.sampler.pick(logits, None),
            Some(m) => {
                let mut ok = |t: u32| match &tok.bytes[t as usize] {
                    None => tok.control[t as usize] && m.can_end(),
                    Some(b) => m.accepts(b),
                };
                self.sampler.pick(logits, Some(&mut ok))
            }
        }
        .ok_or_else(|| Error::Compute("no token can continue the output".into()))?;
        self.generated += 1;
        let Some(bytes) = tok.bytes[next as usize].as_ref() else {
            // A control token (end of text or of the turn) ends the output.
            let read = emit(GenerationEvent::Token {
                id: next,
                text: String::new(),
            });
            self.finish = Some(if read {
                FinishReason::Stop
            } else {
                FinishReason::Cancelled
            });
            return Ok(None);
        };
        if let Some(m) = matcher.as_deref_mut() {
            m.feed_all(bytes);
        }
        self.out.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.out) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = String::from_utf8_lossy(&self.out[..valid]);
        let stops = &self.params.stop;
        let hit = stops.iter().filter_map(|s| text.find(s.as_str())).min();
        let safe = match hit {
            Some(at) => at,
            None => valid - held_back(&text, stops, self.max_stop),
        };
        let delta = if safe > self.emitted {
            text[self.emitted..safe].to_string()
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(safe);
        if !emit(GenerationEvent::Token {
            id: next,
            text: delta,
        }) {
            self.finish = Some(FinishReason::Cancelled);
            return Ok(None);
        }
        if let Some(at) = hit {
            self.out.truncate(at);
            self.finish = Some(FinishReason::StopSequence);
            return Ok(None);
        }
        if matcher.is_some_and(|m| m.is_done()) {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        Ok(Some(next))
    }

    /// The completion, once [`Decoder::step`] said the generation is over: emits the text
    /// held back, parses structured output.
    pub(crate) fn finish(
        self,
        emit: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<Completion> {
        let mut finish = self.finish.unwrap_or(FinishReason::Cancelled);
        let text = String::from_utf8_lossy(&self.out).into_owned();
        if finish != FinishReason::Cancelled && self.emitted < text.len() {
            let rest = text.get(self.emitted..).unwrap_or_default().to_string();
            if !rest.is_empty() && !emit_tail(emit, rest) {
                finish = FinishReason::Cancelled;
            }
        }
        let can_end = self
            .matcher
            .map(|(schema, state)| schema.resume(state).can_end());
        let json = match (can_end, finish) {
            (Some(true), FinishReason::Stop) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::Compute(format!("structured output did not parse: {e}")))?,
            ),
            (Some(_), FinishReason::Length) => {
                return Err(Error::IncompleteStructured(self.generated));
            }
            _ => None,
        };
        Ok(Completion {
            text,
            finish,
            usage: Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.generated,
            },
            json,
        })
    }
}

/// Text held back until the end (a partial character or a possible stop sequence).
fn emit_tail(emit: &mut dyn FnMut(GenerationEvent) -> bool, text: String) -> bool {
    emit(GenerationEvent::Text { text })
}

/// Bytes at the end of `text` that could be the start of a stop sequence.
fn held_back(text: &str, stops: &[String], max_stop: usize) -> usize {
    if max_stop == 0 {
        return 0;
    }
    let start = text.len().saturating_sub(max_stop - 1);
    for (i, _) in text.char_indices().filter(|(i, _)| *i >= start) {
        let suffix = &text[i..];
        if stops.iter().any(|s| s.starts_with(suffix)) {
            return text.len() - i;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn possible_stop_prefixes_are_held_back() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(held_back("hello\nUs", &stops, 6), 3);
        assert_eq!(held_back("hello", &stops, 6), 0);
        assert_eq!(held_back("h\u{e9}", &stops, 6), 0);
    }
}
