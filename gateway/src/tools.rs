//! Tool calls on `/v1/chat/completions`: `tools`, `tool_choice`, assistant `tool_calls` and
//! `tool` messages.
//!
//! Which tool to call (or, with `auto`, whether to call one) is generated under a schema
//! whose only value is an enum of the tool names (and `reply`); the call's arguments are
//! then generated under the tool's own parameter schema, so they always parse and validate.

use serde_json::{Map, Value, json};
use soma_inference::{ToolChoice as Choice, ToolSpec as Tool};

use crate::error::ApiError;

fn wrong(field: &str, expected: &str) -> ApiError {
    ApiError::invalid("invalid_type", field, format!("{field} must be {expected}"))
}

/// Reads `tools` and `tool_choice`; `None` when there are no tools.
pub(crate) fn parse(o: &Map<String, Value>) -> Result<Option<(Vec<Tool>, Choice)>, ApiError> {
    let tools = match o.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            let mut tools = Vec::with_capacity(a.len());
            for (i, t) in a.iter().enumerate() {
                let at = format!("tools[{i}]");
                if t.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(wrong(&format!("{at}.type"), "\"function\""));
                }
                let f = t
                    .get("function")
                    .and_then(Value::as_object)
                    .ok_or_else(|| wrong(&format!("{at}.function"), "an object"))?;
                for key in f.keys() {
                    if !matches!(
                        key.as_str(),
                        "name" | "description" | "parameters" | "strict"
                    ) {
                        return Err(ApiError::invalid(
                            "unknown_parameter",
                            format!("{at}.function.{key}"),
                            format!("{at}.function.{key}: unknown field"),
                        ));
                    }
                }
                let name = f
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= 64
                            && n.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    })
                    .ok_or_else(|| {
                        wrong(
                            &format!("{at}.function.name"),
                            "1-64 of a-z, A-Z, 0-9, _ and -",
                        )
                    })?
                    .to_string();
                if tools.iter().any(|t: &Tool| t.name == name) {
                    return Err(ApiError::invalid(
                        "invalid_value",
                        format!("{at}.function.name"),
                        format!("tool {name:?} is defined twice"),
                    ));
                }
                let parameters = f
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                soma_inference::JsonSchema::compile(&parameters).map_err(|e| {
                    ApiError::invalid(
                        "unsupported_schema",
                        format!("{at}.function.parameters"),
                        e.to_string(),
                    )
                })?;
                tools.push(Tool {
                    name,
                    description: f
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    parameters,
                });
            }
            tools
        }
        Some(_) => return Err(wrong("tools", "an array")),
    };
    let choice = match o.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            _ => {
                return Err(wrong(
                    "tool_choice",
                    "\"none\", \"auto\", \"required\" or a function",
                ));
            }
        },
        Some(Value::Object(c)) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| wrong("tool_choice.function.name", "a string"))?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
            Choice::Named(name.to_string())
        }
        Some(_) => return Err(wrong("tool_choice", "a string or an object")),
    };
    if tools.is_empty() {
        return match o.get("tool_choice") {
            None | Some(Value::Null) => Ok(None),
            Some(_) if choice == Choice::None => Ok(None),
            Some(_) => Err(ApiError::invalid(
                "invalid_value",
                "tool_choice",
                "tool_choice needs tools",
            )),
        };
    }
    match o.get("parallel_tool_calls") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => return Err(wrong("parallel_tool_calls", "a boolean")),
    }
    Ok(Some((tools, choice)))
}

/// The text of an assistant message that made tool calls, as the model is shown it.
pub(crate) fn calls_text(calls: &Value, at: &str) -> Result<String, ApiError> {
    let Some(calls) = calls.as_array() else {
        return Err(wrong(at, "an array"));
    };
    let mut out = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        let f = c
            .get("function")
            .ok_or_else(|| wrong(&format!("{at}[{i}].function"), "an object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| wrong(&format!("{at}[{i}].function.name"), "a string"))?;
        let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
        out.push(format!(
            "{{\"tool\": {}, \"arguments\": {args}}}",
            json!(name)
        ));
    }
    Ok(out.join("\n"))
}
