//! `POST /v1/chat/completions`, as OpenAI defines it, over the generator pool.
//!
//! Every field of the request is either understood or refused with a 400 naming it: a
//! client never gets an answer that silently ignored what it asked for.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use futures_util::stream::{self, Stream};
use serde_json::{Map, Value, json};
use soma_inference::{
    ChatMessage, FinishReason, GenerateRequest, GenerationEvent, GenerationStream, Prompt,
    SamplingParams,
};
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::keys::Principal;
use crate::models::Served;
use crate::server::{AppState, body_error, parse_object};

/// Fields of OpenAI's request that are understood.
const KNOWN: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "response_format",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// A checked chat request.
#[derive(Debug)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<ChatMessage>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) params: SamplingParams,
    pub(crate) schema: Option<Value>,
    pub(crate) tools: Option<(Vec<soma_inference::ToolSpec>, soma_inference::ToolChoice)>,
}

fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::invalid("unsupported_parameter", field, format!("{field}: {why}"))
}

fn wrong(field: &str, expected: &str) -> ApiError {
    ApiError::invalid("invalid_type", field, format!("{field} must be {expected}"))
}

fn number(o: &Map<String, Value>, field: &str) -> Result<Option<f64>, ApiError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| wrong(field, "a number")),
    }
}

fn count(o: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong(field, "a non-negative integer")),
    }
}

fn content_text(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                let p = format!("{at}[{i}]");
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), _) => return Err(wrong(&format!("{p}.text"), "a string")),
                    (Some(other), _) => {
                        return Err(unsupported(
                            &format!("{p}.type"),
                            &format!(
                                "content parts of type {other:?} are not supported (text only)"
                            ),
                        ));
                    }
                    (None, _) => return Err(wrong(&format!("{p}.type"), "a string")),
                }
            }
            Ok(text)
        }
        _ => Err(wrong(at, "a string or an array of content parts")),
    }
}

/// Checks and converts an OpenAI chat request.
pub(crate) fn parse(o: &Map<String, Value>) -> Result<ChatRequest, ApiError> {
    for key in o.keys() {
        if !KNOWN.contains(&key.as_str()) {
            let why = match key.as_str() {
                "functions" | "function_call" => "deprecated by OpenAI; use tools and tool_choice",
                "logit_bias" | "top_logprobs" => "not implemented yet",
                _ => "unknown parameter",
            };
            let code = if why == "unknown parameter" {
                "unknown_parameter"
            } else {
                "unsupported_parameter"
            };
            return Err(ApiError::invalid(
                code,
                key.clone(),
                format!("{key}: {why}"),
            ));
        }
    }
    let model = crate::server::model_field(o)?;
    let raw = match o.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "invalid_value",
                "messages",
                "messages must not be empty",
            ));
        }
        Some(_) => return Err(wrong("messages", "an array")),
        None => {
            return Err(ApiError::invalid(
                "missing_parameter",
                "messages",
                "messages is required",
            ));
        }
    };
    let mut messages = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(m) = m.as_object() else {
            return Err(wrong(&at, "an object"));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "developer" | "user" | "assistant")) => {
                if r == "developer" {
                    "system"
                } else {
                    r
                }
            }
            Some("tool") => "tool",
            Some(other) => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    format!("{at}.role"),
                    format!("{at}.role: unknown role {other:?}"),
                ));
            }
            None => return Err(wrong(&format!("{at}.role"), "a string")),
        };
        for key in m.keys() {
            let allowed = match key.as_str() {
                "role" | "content" | "name" => true,
                "tool_calls" | "refusal" => role == "assistant",
                "tool_call_id" => role == "tool",
                _ => false,
            };
            if !allowed {
                return Err(unsupported(&format!("{at}.{key}"), "not supported"));
            }
        }
        let mut content = content_text(
            m.get("content").unwrap_or(&Value::Null),
            &format!("{at}.content"),
        )?;
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
            let text = crate::tools::calls_text(calls, &format!("{at}.tool_calls"))?;
            content = if content.is_empty() {
                text
            } else {
                format!("{content}\n{text}")
            };
        }
        if role == "tool" {
            let id = m
                .get("tool_call_id")
                .and_then(Value::as_str)
                .ok_or_else(|| wrong(&format!("{at}.tool_call_id"), "a string"))?;
            content = format!("Result of tool call {id}: {content}");
        }
        messages.push(ChatMessage::new(role, content));
    }
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(wrong("stream", "a boolean")),
    };
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => {
            for key in so.keys() {
                if key != "include_usage" {
                    return Err(unsupported(
                        &format!("stream_options.{key}"),
                        "unknown option",
                    ));
                }
            }
            if !stream {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "stream_options",
                    "stream_options is only allowed with stream: true",
                ));
            }
            match so.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(wrong("stream_options.include_usage", "a boolean")),
            }
        }
        Some(_) => return Err(wrong("stream_options", "an object")),
    };
    let mut params = SamplingParams::default();
    if let Some(t) = number(o, "temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                "invalid_value",
                "temperature",
                "temperature must be between 0 and 2",
            ));
        }
        params.temperature = t as f32;
    }
    if let Some(p) = number(o, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "invalid_value",
                "top_p",
                "top_p must be in (0, 1]",
            ));
        }
        params.top_p = (p < 1.0).then_some(p as f32);
    }
    if let Some(seed) = o.get("seed").filter(|v| !v.is_null()) {
        params.seed = match (seed.as_u64(), seed.as_i64()) {
            (Some(s), _) => s,
            (None, Some(s)) => s as u64,
            _ => return Err(wrong("seed", "an integer")),
        };
    }
    let max = match (count(o, "max_completion_tokens")?, count(o, "max_tokens")?) {
        (Some(a), _) => Some(("max_completion_tokens", a)),
        (None, Some(b)) => Some(("max_tokens", b)),
        (None, None) => None,
    };
    if let Some((field, n)) = max {
        if n == 0 {
            return Err(ApiError::invalid(
                "invalid_value",
                field,
                format!("{field} must be at least 1"),
            ));
        }
        params.max_tokens = usize::try_from(n).unwrap_or(usize::MAX);
    }
    params.stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong("stop", "a string or an array of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(wrong("stop", "a string or an array of strings")),
    };
    match count(o, "n")? {
        None | Some(1) => {}
        Some(_) => return Err(unsupported("n", "only n = 1 is supported")),
    }
    for field in ["presence_penalty", "frequency_penalty"] {
        match number(o, field)? {
            None => {}
            Some(0.0) => {}
            Some(_) => {
                return Err(unsupported(
                    field,
                    "penalties are not implemented yet (only 0)",
                ));
            }
        }
    }
    match o.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(unsupported("logprobs", "not implemented yet")),
        Some(_) => return Err(wrong("logprobs", "a boolean")),
    }
    if let Some(u) = o.get("user").filter(|v| !v.is_null())
        && !u.is_string()
    {
        return Err(wrong("user", "a string"));
    }
    let schema = match o.get("response_format") {
        None | Some(Value::Null) => None,
        Some(Value::Object(rf)) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_schema") => {
                let js = rf
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .ok_or_else(|| wrong("response_format.json_schema", "an object"))?;
                Some(js.get("schema").cloned().ok_or_else(|| {
                    ApiError::invalid(
                        "missing_parameter",
                        "response_format.json_schema.schema",
                        "response_format.json_schema.schema is required",
                    )
                })?)
            }
            Some("json_object") => {
                return Err(unsupported(
                    "response_format.type",
                    "json_object is not implemented yet; use json_schema",
                ));
            }
            _ => return Err(wrong("response_format.type", "\"text\" or \"json_schema\"")),
        },
        Some(_) => return Err(wrong("response_format", "an object")),
    };
    params.validate().map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_request",
            e.to_string(),
        )
    })?;
    let tools = crate::tools::parse(o)?;
    if tools.is_some() && schema.is_some() {
        return Err(ApiError::invalid(
            "invalid_value",
            "response_format",
            "response_format json_schema cannot be combined with tools",
        ));
    }
    Ok(ChatRequest {
        model,
        messages,
        stream,
        include_usage,
        params,
        schema,
        tools,
    })
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::StopSequence | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

fn completion_id() -> String {
    format!("chatcmpl-{:016x}{:016x}", fastrand_u64(), fastrand_u64())
}

fn fastrand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// The handler.
pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let o = parse_object(&body)?;
    let mut req = parse(&o)?;
    let pool = match crate::server::find_model(&state, &req.model)? {
        Served::Generator(p) => p.clone(),
        Served::Embedder(_) => {
            return Err(ApiError::invalid(
                "model_not_chat",
                "model",
                format!("{} is an embedding model; use /v1/embeddings", req.model),
            ));
        }
    };
    let span = tracing::info_span!("gateway.chat", tenant = %principal.tenant, model = %req.model, stream = req.stream);
    metrics::counter!("soma_gateway_chat_requests_total", "tenant" => principal.tenant.clone(), "model" => req.model.clone()).increment(1);
    let started = Instant::now();
    let created = state.models.created;
    let governed = state.governed.clone();
    if let Some(g) = &governed {
        g.admit(&principal, &req.model, "chat").await?;
    }
    if let Some((tools, choice)) = req.tools.take() {
        if choice != soma_inference::ToolChoice::None {
            soma_inference::describe_tools(&mut req.messages, &tools);
        }
        let outcome = soma_inference::decide_tool(
            &pool,
            &req.messages,
            &req.params,
            &tools,
            &choice,
            Some(&principal.tenant),
        )
        .instrument(span.clone())
        .await?;
        // The tool step cost generations of its own (none with tool_choice none).
        let usage = outcome.usage();
        if usage != soma_inference::Usage::default() {
            meter(
                governed.as_deref(),
                &principal,
                &req.model,
                usage.prompt_tokens,
                usage.completion_tokens,
            )
            .await;
        }
        if let soma_inference::ToolStep::Call {
            name, arguments, ..
        } = outcome
        {
            let arguments = arguments.to_string();
            metrics::counter!("soma_gateway_tool_calls_total", "tenant" => principal.tenant.clone()).increment(1);
            return Ok(tool_call_response(&req, created, &name, &arguments, usage));
        }
    }
    let stream = pool
        .generate(GenerateRequest {
            prompt: Prompt::Chat(req.messages),
            params: req.params,
            schema: req.schema,
            tenant: Some(principal.tenant.clone()),
        })
        .instrument(span.clone())
        .await?;
    let id = completion_id();
    if req.stream {
        let prompt = stream.prompt_tokens();
        return Ok(sse(Streaming {
            inner: Some(stream),
            id,
            model: req.model,
            created,
            include_usage: req.include_usage,
            principal,
            started: Some(started),
            first: true,
            pending: Default::default(),
            stopping: state.stopping.clone(),
            governed: governed.clone(),
            unmetered: Some((prompt, 0)),
        })
        .into_response());
    }
    let completion = stream.complete().instrument(span).await?;
    meter(
        governed.as_deref(),
        &principal,
        &req.model,
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    .await;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(completion.finish),
        }],
        "usage": {
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens,
            "total_tokens": completion.usage.prompt_tokens + completion.usage.completion_tokens,
        },
    }))
    .into_response())
}

/// A tool call as OpenAI returns it: in one body, or as a stream of chunks (the call in one
/// delta: it was generated whole, under its schema).
fn tool_call_response(
    req: &ChatRequest,
    created: u64,
    name: &str,
    arguments: &str,
    usage: soma_inference::Usage,
) -> Response {
    let id = completion_id();
    let call_id = format!("call_{:016x}", fastrand_u64());
    let usage_json = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    });
    if !req.stream {
        return Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": null, "refusal": null, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }]},
                "logprobs": null,
                "finish_reason": "tool_calls",
            }],
            "usage": usage_json,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        .to_string()
    };
    let mut events = vec![
        chunk(json!({"role": "assistant", "content": null}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                   "function": {"name": name, "arguments": arguments}}]}),
            None,
        ),
        chunk(json!({}), Some("tool_calls")),
    ];
    if req.include_usage {
        events.push(
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                   "model": req.model, "choices": [], "usage": usage_json})
            .to_string(),
        );
    }
    events.push("[DONE]".to_string());
    let stream = stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(Event::default().data(e))),
    );
    Sse::new(stream).into_response()
}

/// Counts a model call's tokens in the metrics and, when the node runs tenants, in the
/// tenant's usage.
pub(crate) async fn meter(
    governed: Option<&crate::governed::Governed>,
    principal: &Principal,
    model: &str,
    input: usize,
    output: usize,
) {
    record_usage(principal, model, input, output);
    if let Some(g) = governed {
        g.record(principal, model, input, output).await;
    }
}

pub(crate) fn record_usage(principal: &Principal, model: &str, input: usize, output: usize) {
    metrics::counter!("soma_gateway_tokens_in_total", "tenant" => principal.tenant.clone(), "model" => model.to_string()).increment(input as u64);
    metrics::counter!("soma_gateway_tokens_out_total", "tenant" => principal.tenant.clone(), "model" => model.to_string()).increment(output as u64);
}

struct Streaming {
    inner: Option<GenerationStream>,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    principal: Principal,
    /// When the request arrived, until its first token is counted.
    started: Option<Instant>,
    first: bool,
    pending: std::collections::VecDeque<Event>,
    stopping: tokio::sync::watch::Receiver<bool>,
    governed: Option<Arc<crate::governed::Governed>>,
    /// Prompt tokens and tokens generated so far, until metered: a stream cut before its
    /// end (client gone, shutdown, error) is metered for what it cost when it drops.
    unmetered: Option<(usize, usize)>,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let Some((prompt, generated)) = self.unmetered.take() else {
            return;
        };
        let (governed, principal, model) = (
            self.governed.clone(),
            self.principal.clone(),
            self.model.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                meter(governed.as_deref(), &principal, &model, prompt, generated).await;
            });
        } else {
            record_usage(&principal, &model, prompt, generated);
        }
    }
}

impl Streaming {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        Event::default().data(
            json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
            .to_string(),
        )
    }
}

fn sse(state: Streaming) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok(e), s));
            }
            let inner = s.inner.as_mut()?;
            if s.first {
                s.first = false;
                let e = s.chunk(json!({"role": "assistant", "content": ""}), None);
                return Some((Ok(e), s));
            }
            let next = tokio::select! {
                next = inner.next() => Some(next),
                _ = s.stopping.wait_for(|stop| *stop) => None,
            };
            let Some(next) = next else {
                // The node is shutting down: end the stream with a final event rather than
                // cut it (the generation is cancelled when the stream drops).
                s.inner = None;
                let body = json!({"error": {
                    "message": "the server is shutting down; the answer was cut",
                    "type": "server_error", "param": null, "code": "shutting_down"}});
                s.pending.push_back(Event::default().data("[DONE]"));
                return Some((Ok(Event::default().data(body.to_string())), s));
            };
            match next {
                Some(Ok(
                    event @ (GenerationEvent::Token { .. } | GenerationEvent::Text { .. }),
                )) => {
                    let text = match event {
                        GenerationEvent::Token { text, .. } => {
                            if let Some((_, n)) = s.unmetered.as_mut() {
                                *n += 1;
                            }
                            text
                        }
                        GenerationEvent::Text { text } => text,
                        GenerationEvent::Done(_) => String::new(),
                    };
                    if text.is_empty() {
                        continue;
                    }
                    if let Some(started) = s.started.take() {
                        metrics::histogram!("soma_gateway_first_token_seconds")
                            .record(started.elapsed().as_secs_f64());
                    }
                    let e = s.chunk(json!({"content": text}), None);
                    return Some((Ok(e), s));
                }
                Some(Ok(GenerationEvent::Done(c))) => {
                    s.inner = None;
                    s.unmetered = None;
                    meter(
                        s.governed.as_deref(),
                        &s.principal,
                        &s.model,
                        c.usage.prompt_tokens,
                        c.usage.completion_tokens,
                    )
                    .await;
                    let fin = s.chunk(json!({}), Some(finish_reason(c.finish)));
                    if s.include_usage {
                        s.pending.push_back(Event::default().data(
                            json!({
                                "id": s.id,
                                "object": "chat.completion.chunk",
                                "created": s.created,
                                "model": s.model,
                                "choices": [],
                                "usage": {
                                    "prompt_tokens": c.usage.prompt_tokens,
                                    "completion_tokens": c.usage.completion_tokens,
                                    "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens,
                                },
                            })
                            .to_string(),
                        ));
                    }
                    s.pending.push_back(Event::default().data("[DONE]"));
                    return Some((Ok(fin), s));
                }
                Some(Err(e)) => {
                    s.inner = None;
                    let err = ApiError::from(e);
                    let body = json!({"error": {"message": err.message, "type": err.kind, "param": null, "code": err.code}});
                    s.pending.push_back(Event::default().data("[DONE]"));
                    return Some((Ok(Event::default().data(body.to_string())), s));
                }
                None => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
