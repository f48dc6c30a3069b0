//! Tool calling on the generator: which tool to call (or, with [`ToolChoice::Auto`], whether
//! to call one) is generated under a schema whose only value is an enum of the tool names
//! (and `reply`); the call's arguments are then generated under the tool's own parameter
//! schema, so they always parse and validate. The gateway's `/v1/chat/completions` and the
//! agents' loop both decide their tool steps here.

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::generate::{ChatMessage, GenerateRequest, Prompt, Usage};
use crate::pool::GeneratorPool;
use crate::sample::SamplingParams;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Its name.
    pub name: String,
    /// What it does, as the model is told.
    pub description: String,
    /// The JSON schema of its arguments (an object).
    pub parameters: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never: answer in text.
    None,
    /// The model decides.
    Auto,
    /// One of the tools, the model picks which.
    Required,
    /// This tool.
    Named(String),
}

/// What a tool step decided.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolStep {
    /// Answer in text; `usage` is what deciding so cost.
    Reply {
        /// Tokens the decision took.
        usage: Usage,
    },
    /// A call.
    Call {
        /// The tool.
        name: String,
        /// Its arguments, valid against its schema.
        arguments: Value,
        /// Tokens the decision and the arguments took.
        usage: Usage,
    },
}

impl ToolStep {
    /// What the step cost.
    pub fn usage(&self) -> Usage {
        match self {
            ToolStep::Reply { usage } | ToolStep::Call { usage, .. } => *usage,
        }
    }
}

/// Adds the tools' description to the system message (or a new first one).
pub fn describe_tools(messages: &mut Vec<ChatMessage>, tools: &[ToolSpec]) {
    let mut text =
        String::from("You can call these tools. Each is a function taking JSON arguments:\n");
    for t in tools {
        text.push_str(&format!(
            "- {}: {} Parameters: {}\n",
            t.name, t.description, t.parameters
        ));
    }
    text.push_str("When a tool helps, call it; when you can answer, answer.");
    match messages.first_mut() {
        Some(m) if m.role == "system" => {
            m.content = format!("{}\n\n{text}", m.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", text)),
    }
}

fn add(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens + b.prompt_tokens,
        completion_tokens: a.completion_tokens + b.completion_tokens,
    }
}

/// Decides a tool step on `messages` (which should already describe the tools, see
/// [`describe_tools`]): which tool to call, if any, and with what arguments.
pub async fn decide_tool(
    pool: &GeneratorPool,
    messages: &[ChatMessage],
    params: &SamplingParams,
    tools: &[ToolSpec],
    choice: &ToolChoice,
    tenant: Option<&str>,
) -> Result<ToolStep> {
    let mut usage = Usage::default();
    let tool = match choice {
        ToolChoice::None => return Ok(ToolStep::Reply { usage }),
        ToolChoice::Named(n) => n.clone(),
        ToolChoice::Required if tools.len() == 1 => tools[0].name.clone(),
        ToolChoice::Required | ToolChoice::Auto => {
            if tools.is_empty() {
                return if *choice == ToolChoice::Auto {
                    Ok(ToolStep::Reply { usage })
                } else {
                    Err(Error::InvalidRequest(
                        "a tool call is required but there are no tools".into(),
                    ))
                };
            }
            let mut options: Vec<Value> = tools.iter().map(|t| json!(t.name)).collect();
            if *choice == ToolChoice::Auto {
                options.insert(0, json!("reply"));
            }
            let mut p = params.clone();
            p.max_tokens = 64;
            p.stop.clear();
            let decision = pool
                .complete(GenerateRequest {
                    prompt: Prompt::Chat(messages.to_vec()),
                    params: p,
                    schema: Some(json!({
                        "type": "object",
                        "properties": {"tool": {"enum": options}},
                        "required": ["tool"],
                        "additionalProperties": false,
                    })),
                    tenant: tenant.map(str::to_string),
                })
                .await?;
            usage = add(usage, decision.usage);
            let picked = decision
                .json
                .as_ref()
                .and_then(|v| v.get("tool"))
                .and_then(Value::as_str)
                .ok_or_else(|| Error::Compute("the tool decision produced no value".into()))?
                .to_string();
            if picked == "reply" {
                return Ok(ToolStep::Reply { usage });
            }
            picked
        }
    };
    let Some(t) = tools.iter().find(|t| t.name == tool) else {
        return Err(Error::InvalidRequest(format!(
            "the tool choice names {tool:?}, which is not among the tools"
        )));
    };
    let mut prompt = messages.to_vec();
    prompt.push(ChatMessage::new(
        "system",
        format!(
            "Call the tool {} now. Reply with its arguments as JSON only.",
            t.name
        ),
    ));
    let mut p = params.clone();
    p.stop.clear();
    let args = pool
        .complete(GenerateRequest {
            prompt: Prompt::Chat(prompt),
            params: p,
            schema: Some(t.parameters.clone()),
            tenant: tenant.map(str::to_string),
        })
        .await?;
    usage = add(usage, args.usage);
    let arguments = match args.json {
        Some(v) => v,
        None => serde_json::from_str(&args.text).map_err(|e| {
            Error::Compute(format!(
                "the arguments of tool {} are not JSON: {e}",
                t.name
            ))
        })?,
    };
    Ok(ToolStep::Call {
        name: t.name.clone(),
        arguments,
        usage,
    })
}
