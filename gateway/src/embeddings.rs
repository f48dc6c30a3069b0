//! `POST /v1/embeddings` over the embedder pool.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Json;
use base64::Engine as _;
use serde_json::{Value, json};
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::keys::Principal;
use crate::models::Served;
use crate::server::{AppState, body_error, parse_object};

fn wrong(field: &str, expected: &str) -> ApiError {
    ApiError::invalid("invalid_type", field, format!("{field} must be {expected}"))
}

/// The handler.
pub(crate) async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(body_error)?;
    let o = parse_object(&body)?;
    for key in o.keys() {
        if !matches!(
            key.as_str(),
            "model" | "input" | "encoding_format" | "dimensions" | "user"
        ) {
            return Err(ApiError::invalid(
                "unknown_parameter",
                key.clone(),
                format!("{key}: unknown parameter"),
            ));
        }
    }
    let model = crate::server::model_field(&o)?;
    let texts: Vec<String> = match o.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Array(_) => Err(ApiError::invalid(
                    "unsupported_parameter",
                    format!("input[{i}]"),
                    "token-id input is not supported; send text",
                )),
                _ => Err(wrong(&format!("input[{i}]"), "a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "invalid_value",
                "input",
                "input must not be empty",
            ));
        }
        Some(_) => return Err(wrong("input", "a string or an array of strings")),
        None => {
            return Err(ApiError::invalid(
                "missing_parameter",
                "input",
                "input is required",
            ));
        }
    };
    let base64 = match o.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err(wrong("encoding_format", "\"float\" or \"base64\"")),
    };
    let pool = match crate::server::find_model(&state, &model)? {
        Served::Embedder(p) => p.clone(),
        Served::Generator(_) => {
            return Err(ApiError::invalid(
                "model_not_embedding",
                "model",
                format!("{model} is a chat model; use /v1/chat/completions"),
            ));
        }
    };
    match o.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(d) => match d.as_u64() {
            Some(n) if n as usize == pool.dimension() => {}
            Some(n) => {
                return Err(ApiError::invalid(
                    "unsupported_dimensions",
                    "dimensions",
                    format!(
                        "{model} has {} dimensions and cannot produce {n}",
                        pool.dimension()
                    ),
                ));
            }
            None => return Err(wrong("dimensions", "a positive integer")),
        },
    }
    if texts.len() > pool.max_texts() {
        return Err(ApiError::invalid(
            "too_many_inputs",
            "input",
            format!(
                "{} inputs in one request; at most {}",
                texts.len(),
                pool.max_texts()
            ),
        ));
    }
    if let Some(g) = &state.governed {
        g.admit(&principal, &model, "embedding").await?;
    }
    let span = tracing::info_span!("gateway.embeddings", tenant = %principal.tenant, model = %model, inputs = texts.len());
    let mut tokens = 0usize;
    let most = pool.model().max_tokens();
    for (i, t) in texts.iter().enumerate() {
        // Counted without the model's truncation: a text longer than the model reads is
        // refused, as OpenAI does, rather than embedded in part.
        let n = pool.model().token_count(t)?;
        if n > most {
            return Err(ApiError::invalid(
                "input_too_long",
                if texts.len() == 1 {
                    "input".to_string()
                } else {
                    format!("input[{i}]")
                },
                format!("{n} tokens; {model} reads at most {most}"),
            ));
        }
        tokens += n;
    }
    let vectors = pool.embed_many(texts).instrument(span).await?;
    crate::chat::meter(state.governed.as_deref(), &principal, &model, tokens, 0).await;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}
