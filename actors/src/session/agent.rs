//! The agent loop: one turn per user message, run inside the session actor's handler.
//!
//! A turn builds the prompt (the persona's system prompt, memories recalled by vector
//! search, the history cut to the model's context, the user message, the turn's tool calls
//! so far), decides a tool step on the generator, runs the call as a tool-call actor, feeds
//! the result back, and ends on an answer, a deny, a cancel, an approval to wait for, or a
//! failure. After `max_steps` tool calls the model must answer. Every model call, tool call
//! and memory read passes the tenant's constitution first.
//!
//! Step `k` of turn `t` of session `s` is tool call `s-t-k`. A turn replayed after a crash
//! finds the calls its steps made before it and reuses them (their recorded arguments and
//! results) instead of generating those steps again; only the steps after them are
//! generated anew.
//!
//! History rule: the newest history entries that fit are kept, oldest dropped first, so that
//! the prompt plus the larger of `max_tokens_per_turn` and [`TOOL_STEP_TOKENS`] plus
//! [`TOOL_STEP_MARGIN`] tokens fits the model's context; if the system prompt, memories, user message and the turn's tool calls alone do
//! not fit, the turn fails.

use serde_json::{Value, json};
use soma_adapters::{Entry, Scope};
use soma_inference::{
    ChatMessage, GenerateRequest, GenerationEvent, GeneratorPool, Prompt, SamplingParams,
    ToolChoice, ToolStep, decide_tool, describe_tools,
};
use tokio::sync::watch;

use super::hub::Update;
use super::{EventKind, Persona, SessionState, Shared, ToolUse, TurnEnd};
use crate::constitution::{Action, Decision, Principal, PrincipalKind};
use crate::error::Error;
use crate::toolcall::{CallRequest, now_ms};

/// History entries read for a prompt, at most.
pub const HISTORY_ENTRIES: usize = 64;
/// Tokens a tool step may generate for its arguments.
pub const TOOL_STEP_TOKENS: usize = 256;
/// Tokens kept free for the tool step's own instructions.
pub const TOOL_STEP_MARGIN: usize = 96;

/// One turn being run.
pub(crate) struct Turn<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) key: &'a str,
    pub(crate) tenant: &'a str,
    pub(crate) session: &'a str,
    pub(crate) turn: u64,
    pub(crate) text: &'a str,
    pub(crate) cancel: watch::Receiver<bool>,
}

enum Gate {
    Go,
    Stop(TurnEnd),
}

fn seed(session: &str, turn: u64, step: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^ turn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(step)
}

/// Bytes of a tool result an event keeps (the model sees it whole).
pub const MAX_EVENT_TEXT: usize = 16 * 1024;

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &text[..end], text.len() - end)
}

fn failed(what: &str, e: impl std::fmt::Display) -> TurnEnd {
    TurnEnd::Failed {
        message: format!("{what}: {e}"),
    }
}

impl Turn<'_> {
    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Decides `action` at gate `id` (`session-turn-message`, `session-turn-recall`,
    /// `session-turn-step-generate`). An escalation waits for a human: the turn ends
    /// `AwaitingApproval` naming the gate, and once it is decided the turn runs again and finds
    /// the decision here.
    async fn gate(
        &self,
        s: &SessionState,
        id: String,
        principal: &Principal,
        action: Action,
        resource: Value,
    ) -> Gate {
        let verdict = self
            .shared
            .deps
            .tenants
            .decide(
                self.tenant,
                principal.clone(),
                &format!("session/{}", self.session),
                action,
                resource,
                now_ms(),
            )
            .await;
        match verdict {
            Ok(v) => match v.decision {
                Decision::Allow => Gate::Go,
                Decision::Deny { reasons } => Gate::Stop(TurnEnd::Denied { reasons }),
                Decision::Escalate { reasons } => match s.approvals.get(&id) {
                    Some(a) if a.approved => Gate::Go,
                    Some(a) => Gate::Stop(TurnEnd::Denied {
                        reasons: vec![format!("rejected by {}: {}", a.by, a.comment)],
                    }),
                    None => {
                        tracing::info!(tenant = self.tenant, session = self.session, gate = %id, ?reasons, "turn waits for an approval");
                        Gate::Stop(TurnEnd::AwaitingApproval { approval: id })
                    }
                },
            },
            Err(e) => Gate::Stop(failed("the constitution could not decide", e)),
        }
    }

    async fn meter(&self, s: &mut SessionState, model: &str, usage: soma_inference::Usage) {
        let (tin, tout) = (usage.prompt_tokens as u64, usage.completion_tokens as u64);
        if tin == 0 && tout == 0 {
            return;
        }
        let u = s.usage.entry(model.to_string()).or_default();
        u.0 = u.0.saturating_add(tin);
        u.1 = u.1.saturating_add(tout);
        if let Err(e) = self
            .shared
            .deps
            .tenants
            .record_usage_of(
                self.tenant,
                model,
                Some(&s.user),
                Some(self.session),
                tin,
                tout,
                now_ms(),
            )
            .await
        {
            tracing::warn!(tenant = self.tenant, error = %e, "cannot meter a model call");
        }
    }

    /// Runs the turn to its end, recording its events in `s`.
    pub(crate) async fn run(mut self, s: &mut SessionState) -> TurnEnd {
        let Some(persona) = s.persona.clone() else {
            return failed("the session", "has no persona");
        };
        let Some(pool) = self.shared.deps.generators.get(&persona.model).cloned() else {
            return failed(
                "the persona's model",
                format!("{:?} is not loaded", persona.model),
            );
        };
        let user = Principal {
            kind: PrincipalKind::User,
            id: s.user.clone(),
            roles: Vec::new(),
        };
        let agent = Principal {
            kind: PrincipalKind::Agent,
            id: persona.name.clone(),
            roles: Vec::new(),
        };
        if let Gate::Stop(end) = self
            .gate(
                s,
                format!("{}-{}-message", self.session, self.turn),
                &user,
                Action::SessionMessage,
                json!({"session": self.session, "tenant": self.tenant}),
            )
            .await
        {
            return end;
        }
        let scope = match Scope::new(self.tenant, self.session) {
            Ok(scope) => scope,
            Err(e) => return failed("the session's scope", e),
        };
        let past = match self
            .shared
            .deps
            .episodic
            .last(&scope, HISTORY_ENTRIES)
            .await
        {
            Ok(past) => past,
            Err(e) => return failed("reading the history", e),
        };
        let history: Vec<ChatMessage> = past
            .iter()
            .filter(|e| e.entry.metadata.get("turn").and_then(Value::as_u64) != Some(self.turn))
            .map(|e| ChatMessage::new(e.entry.role.clone(), e.entry.content.clone()))
            .collect();
        let memories = match self.recall(s, &persona, &agent).await {
            Ok(m) => m,
            Err(end) => return end,
        };
        let specs = self.shared.deps.tool_calls.tools().specs(&persona.tools);
        let mut transcript: Vec<ChatMessage> = Vec::new();
        for step in 0..=persona.max_steps {
            if self.cancelled() {
                return TurnEnd::Cancelled;
            }
            let mut messages = match self.prompt(&pool, &persona, &memories, &history, &transcript)
            {
                Ok(m) => m,
                Err(end) => return end,
            };
            let call_id = format!("{}-{}-{step}", self.session, self.turn);
            let recorded = match self.shared.deps.tool_calls.get(self.tenant, &call_id).await {
                // Only a call this session's turn made, of a tool its persona may use, is its
                // own step (another caller of the tenant may have used the id first).
                Ok(r)
                    if r.session.as_deref() == Some(self.session)
                        && persona.tools.contains(&r.tool) =>
                {
                    Some(r)
                }
                Ok(_) => {
                    return failed(
                        "the tool call",
                        format!("id {call_id} is taken by another caller"),
                    );
                }
                Err(Error::NotFound { .. }) => None,
                Err(e) => return failed("reading a tool call", e),
            };
            let record = match recorded {
                Some(r) => r,
                None => {
                    if let Gate::Stop(end) = self
                        .gate(
                            s,
                            format!("{}-{}-{step}-generate", self.session, self.turn),
                            &agent,
                            Action::ModelGenerate,
                            json!({"model": persona.model, "tenant": self.tenant}),
                        )
                        .await
                    {
                        return end;
                    }
                    let choice = if specs.is_empty() || step == persona.max_steps {
                        ToolChoice::None
                    } else if step == 0 && persona.tool_use == ToolUse::FirstStep {
                        ToolChoice::Required
                    } else {
                        ToolChoice::Auto
                    };
                    let answer_prompt = messages.clone();
                    if choice != ToolChoice::None {
                        describe_tools(&mut messages, &specs);
                    }
                    let params = SamplingParams {
                        temperature: persona.temperature,
                        seed: seed(self.session, self.turn, step),
                        max_tokens: persona.max_tokens_per_turn as usize,
                        ..SamplingParams::default()
                    };
                    // The tool step has a budget of its own: arguments must be complete.
                    let step_params = SamplingParams {
                        max_tokens: TOOL_STEP_TOKENS,
                        ..params.clone()
                    };
                    let decided = decide_tool(
                        &pool,
                        &messages,
                        &step_params,
                        &specs,
                        &choice,
                        Some(self.tenant),
                    )
                    .await;
                    let decided = match decided {
                        Ok(d) => d,
                        Err(e) => return failed("the tool step", e),
                    };
                    self.meter(s, &persona.model, decided.usage()).await;
                    match decided {
                        ToolStep::Reply { .. } => {
                            let prompt = if choice == ToolChoice::None {
                                messages
                            } else {
                                answer_prompt
                            };
                            return self
                                .answer(s, &pool, &persona, prompt, params, &scope)
                                .await;
                        }
                        ToolStep::Call {
                            name, arguments, ..
                        } => {
                            let req = CallRequest {
                                tool: name,
                                arguments: arguments.to_string(),
                                principal: agent.clone(),
                                session: Some(self.session.to_string()),
                            };
                            match self
                                .shared
                                .deps
                                .tool_calls
                                .call(self.tenant, &call_id, req)
                                .await
                            {
                                Ok(r) => r,
                                Err(e) => return failed("the tool call", e),
                            }
                        }
                    }
                }
            };
            let arguments = record.arguments.to_string();
            // A turn run again (resumed after an approval) records each call's events once.
            let seen = |s: &SessionState, result: bool| {
                s.events.iter().any(|e| {
                    e.turn == self.turn
                        && match &e.kind {
                            EventKind::ToolCall { call_id: c, .. } => !result && *c == call_id,
                            EventKind::ToolResult { call_id: c, .. } => result && *c == call_id,
                            _ => false,
                        }
                })
            };
            if !seen(s, false) {
                self.shared.emit(
                    self.key,
                    s,
                    self.turn,
                    EventKind::ToolCall {
                        call_id: call_id.clone(),
                        tool: record.tool.clone(),
                        arguments: arguments.clone(),
                    },
                );
            }
            let reported = seen(s, true);
            let result = match record.outcome() {
                None => return TurnEnd::AwaitingApproval { approval: call_id },
                Some(outcome) => {
                    let (ok, text) = match outcome {
                        Ok(v) => (true, v.to_string()),
                        Err(e) => (
                            false,
                            json!({"error": e.message, "kind": e.kind}).to_string(),
                        ),
                    };
                    if !reported {
                        self.shared.emit(
                            self.key,
                            s,
                            self.turn,
                            EventKind::ToolResult {
                                call_id: call_id.clone(),
                                ok,
                                result: clip(&text, MAX_EVENT_TEXT),
                            },
                        );
                    }
                    text
                }
            };
            transcript.push(ChatMessage::new(
                "assistant",
                format!(
                    "{{\"tool\": {}, \"arguments\": {arguments}}}",
                    json!(record.tool)
                ),
            ));
            transcript.push(ChatMessage::new("tool", result));
        }
        // The last step answers without tools, so the loop always returns from inside.
        failed("the turn", "ended without an answer")
    }

    async fn recall(
        &self,
        s: &SessionState,
        persona: &Persona,
        agent: &Principal,
    ) -> Result<Vec<String>, TurnEnd> {
        let Some(memory) = &self.shared.deps.memory else {
            return Ok(Vec::new());
        };
        if persona.recall == 0 {
            return Ok(Vec::new());
        }
        if let Gate::Stop(end) = self
            .gate(
                s,
                format!("{}-{}-recall", self.session, self.turn),
                agent,
                Action::MemoryRead,
                json!({"tenant": self.tenant, "kind": "vector"}),
            )
            .await
        {
            return Err(end);
        }
        match memory
            .recall(self.tenant, self.text, persona.recall as usize)
            .await
        {
            Ok(found) => Ok(found.into_iter().map(|r| r.text).collect()),
            Err(e) => Err(failed("recalling memories", e)),
        }
    }

    /// The prompt of a step, its history cut to fit the context.
    fn prompt(
        &self,
        pool: &GeneratorPool,
        persona: &Persona,
        memories: &[String],
        history: &[ChatMessage],
        transcript: &[ChatMessage],
    ) -> Result<Vec<ChatMessage>, TurnEnd> {
        let mut system = persona.system_prompt.clone();
        if !memories.is_empty() {
            system.push_str("\n\nWhat you remember:\n");
            for m in memories {
                system.push_str(&format!("- {m}\n"));
            }
        }
        let model = pool.model();
        let generated = (persona.max_tokens_per_turn as usize).max(TOOL_STEP_TOKENS);
        let budget = model
            .context_length()
            .saturating_sub(generated + TOOL_STEP_MARGIN);
        let mut skip = 0;
        loop {
            let mut messages = vec![ChatMessage::new("system", system.clone())];
            messages.extend(history[skip..].iter().cloned());
            messages.push(ChatMessage::new("user", self.text));
            messages.extend(transcript.iter().cloned());
            let tokens = model
                .chat_tokens(&messages)
                .map_err(|e| failed("rendering the prompt", e))?
                .len();
            if tokens <= budget {
                return Ok(messages);
            }
            if skip == history.len() {
                return Err(failed(
                    "the prompt",
                    format!(
                        "{tokens} tokens do not fit the model's context of {budget} for a prompt"
                    ),
                ));
            }
            skip += 1;
        }
    }

    /// Generates the answer, streaming its text to the subscribers, and records it.
    async fn answer(
        &mut self,
        s: &mut SessionState,
        pool: &GeneratorPool,
        persona: &Persona,
        messages: Vec<ChatMessage>,
        params: SamplingParams,
        scope: &Scope,
    ) -> TurnEnd {
        let stream = pool
            .generate(GenerateRequest {
                prompt: Prompt::Chat(messages),
                params,
                schema: None,
                tenant: Some(self.tenant.to_string()),
            })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => return failed("the answer", e),
        };
        let completion = loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = self.cancel.wait_for(|c| *c) => return TurnEnd::Cancelled,
            };
            match event {
                Some(Ok(GenerationEvent::Token { text, .. } | GenerationEvent::Text { text })) => {
                    if !text.is_empty() {
                        self.shared.hub.publish(
                            self.key,
                            Update::Token {
                                turn: self.turn,
                                text,
                            },
                        );
                    }
                }
                Some(Ok(GenerationEvent::Done(c))) => break c,
                Some(Err(e)) => return failed("the answer", e),
                None => return failed("the answer", "the generation ended without a result"),
            }
        };
        self.meter(s, &persona.model, completion.usage).await;
        let text = completion.text.trim().to_string();
        // History: the user message and the answer, each once even if a replay gets here
        // again.
        let recorded = self
            .shared
            .deps
            .episodic
            .last(scope, 2)
            .await
            .unwrap_or_default();
        let has = |role: &str| {
            recorded.iter().any(|e| {
                e.entry.role == role
                    && e.entry.metadata.get("turn").and_then(Value::as_u64) == Some(self.turn)
            })
        };
        let at_ms = now_ms();
        for (role, content) in [("user", self.text), ("assistant", text.as_str())] {
            if has(role) {
                continue;
            }
            let entry = Entry {
                at_ms,
                role: role.to_string(),
                content: content.to_string(),
                metadata: json!({"turn": self.turn}),
            };
            if let Err(e) = self.shared.deps.episodic.append(scope, entry).await {
                return failed("writing the history", e);
            }
        }
        self.shared
            .emit(self.key, s, self.turn, EventKind::Answer { text });
        TurnEnd::Answered
    }
}
