//! End to end against a `soma serve` process: the OpenAI-compatible API, API keys, limits,
//! bad input, metrics, and shutdown on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::{Value, json};

const CHAT: &str = "SmolLM2-135M-Instruct";
const EMBED: &str = "all-MiniLM-L6-v2";

fn models_dir() -> PathBuf {
    std::env::var_os("SOMA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

fn soma(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_soma"));
    c.env("SOMA_DATA", data)
        .env("SOMA_MODELS", models_dir())
        .env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("SOMA_LISTEN");
    c
}

fn create_key(data: &Path, tenant: &str) -> (String, String) {
    let out = soma(data)
        .args(["keys", "create", "--tenant", tenant])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let id = lines[0].split_whitespace().next().unwrap().to_string();
    let key = lines.last().unwrap().to_string();
    assert!(
        key.starts_with("sk-soma-"),
        "the key is alone on the last line: {text}"
    );
    (id, key)
}

struct Server {
    child: Child,
    base: String,
    stdout: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Server {
    fn start(data: &Path, config: Option<&Path>) -> Server {
        let mut cmd = soma(data);
        cmd.arg("serve").args(["--listen", "127.0.0.1:0"]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                lines.push(line);
            }
            lines
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("soma serve printed its address");
        Server {
            child,
            base,
            stdout: Some(reader),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, then the exit status and what it printed.
    fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        let lines = self.stdout.take().unwrap().join().unwrap();
        (status, lines)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(s: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(s.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": CHAT, "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

/// The content deltas, the finish reason, the usage chunk (if any) and whether `[DONE]`
/// came last, of an SSE chat stream.
async fn read_stream(
    resp: reqwest::Response,
) -> (String, Option<String>, Option<Value>, Vec<Value>) {
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut events = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                events.push(Value::String("[DONE]".into()));
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(c);
            }
            if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
            if v.get("usage").is_some() {
                usage = Some(v["usage"].clone());
            }
            events.push(v);
        }
    }
    (text, finish, usage, events)
}

/// A streamed chat request, whatever its answer.
async fn open_stream(s: &Server, key: &str, mut body: Value) -> reqwest::Response {
    body["stream"] = json!(true);
    client()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn stream(s: &Server, key: &str, body: Value) -> reqwest::Response {
    let r = open_stream(s, key, body).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_answers_chat_embeddings_and_models() {
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "acme");
    let s = Server::start(data.path(), None);

    // Liveness, readiness, models.
    let health = client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = client()
        .get(s.url("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let models: Value = client()
        .get(s.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![CHAT, EMBED]);
    let one = client()
        .get(s.url(&format!("/v1/models/{CHAT}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);

    // Chat, not streamed.
    let (status, body) = post(
        &s,
        &key,
        "/v1/chat/completions",
        chat("Name three colours.", 12),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let u = &body["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + 12
    );

    // The same request streamed gives the same text (greedy), then usage, then [DONE].
    let mut req = chat("Name three colours.", 12);
    req["stream_options"] = json!({"include_usage": true});
    let (streamed, finish, usage, events) = read_stream(stream(&s, &key, req).await).await;
    assert_eq!(streamed, text);
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(usage.unwrap()["completion_tokens"], 12);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");

    // 16 concurrent streams, each the text it gets alone.
    let alone: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..4 {
            let (_, b) = post(
                &s,
                &key,
                "/v1/chat/completions",
                chat(&format!("Count to {i}."), 6),
            )
            .await;
            v.push(
                b["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        v
    };
    let streams = (0..16).map(|i| {
        let s = &s;
        let key = key.clone();
        async move {
            read_stream(stream(s, &key, chat(&format!("Count to {}.", i % 4), 6)).await)
                .await
                .0
        }
    });
    let together = futures_util::future::join_all(streams).await;
    for (i, t) in together.iter().enumerate() {
        assert_eq!(t, &alone[i % 4], "stream {i}");
    }

    // Structured output.
    let mut req = chat("Give a colour and a number.", 80);
    req["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "pick", "schema": {
        "type": "object",
        "properties": {"colour": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["colour", "n"], "additionalProperties": false}}});
    let (status, body) = post(&s, &key, "/v1/chat/completions", req).await;
    assert_eq!(status, 200, "{body}");
    let value: Value =
        serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(
        value["colour"].is_string() && value["n"].is_i64(),
        "{value}"
    );

    // Tool calls: named, required among two (streamed), and auto.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                           "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                           "required": ["city"], "additionalProperties": false}}}
    ]);
    let mut req = chat("What is the weather in Paris?", 60);
    req["tools"] = tools.clone();
    req["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let (status, body) = post(&s, &key, "/v1/chat/completions", req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_time");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    let mut req = chat("What is the weather in Paris?", 60);
    req["tools"] = tools.clone();
    req["tool_choice"] = json!("required");
    let (_, finish, _, events) = read_stream(stream(&s, &key, req).await).await;
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let streamed_call = events
        .iter()
        .find_map(|e| {
            e["choices"][0]["delta"]["tool_calls"][0]
                .as_object()
                .cloned()
        })
        .unwrap();
    let name = streamed_call["function"]["name"].as_str().unwrap();
    assert!(name == "get_weather" || name == "get_time", "{name}");
    let mut req = chat("What is the weather in Paris?", 60);
    req["tools"] = tools.clone();
    let (status, body) = post(&s, &key, "/v1/chat/completions", req).await;
    assert_eq!(status, 200, "{body}");
    let f = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        f == "tool_calls" || body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
    let mut req = chat("hi", 5);
    req["tools"] = json!([{"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "patternProperties": {}}}}]);
    let (status, body) = post(&s, &key, "/v1/chat/completions", req).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("tools[0].function.parameters")),
        "{body}"
    );

    // Embeddings, float and base64: the same vectors, unit length.
    let (status, float) = post(
        &s,
        &key,
        "/v1/embeddings",
        json!({"model": EMBED, "input": ["a cat", "a dog"]}),
    )
    .await;
    assert_eq!(status, 200, "{float}");
    let v0: Vec<f32> = float["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(v0.len(), 384);
    let norm: f32 = v0.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    assert!(float["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);
    let (_, b64) = post(
        &s,
        &key,
        "/v1/embeddings",
        json!({"model": EMBED, "input": "a cat", "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, v0);

    // A client that goes away mid-stream frees its generation.
    let r = stream(&s, &key, chat("Tell a very long story.", 4000)).await;
    let mut body = r.bytes_stream();
    let _ = body.next().await;
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = client()
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.lines().any(|l| {
            l.starts_with("soma_inference_requests_total{")
                && l.contains("outcome=\"cancelled\"")
                && l.contains("pool=\"generator\"")
        }) {
            assert!(
                m.contains("soma_gateway_requests_total{"),
                "gateway metrics exported"
            );
            assert!(
                m.contains("soma_gateway_tokens_out_total{"),
                "per-tenant tokens exported"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cut stream's generation was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The official OpenAI Python client (installed by `scripts/setup.sh`), unchanged, against
/// the node: chat, streaming, `json_schema`, embeddings, models, 401, 404 and 400.
#[test]
fn the_official_openai_client_works_against_it() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/openai-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh",
        python.display()
    );
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "acme");
    let s = Server::start(data.path(), None);
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py"))
        .arg(&s.base)
        .arg(&key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "chat ok",
        "stream ok",
        "json_schema ok",
        "embeddings ok",
        "401 ok",
        "404 ok",
        "400 ok",
        "models ok",
    ] {
        assert!(stdout.contains(check), "{check} missing from {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_that_name_what_is_wrong() {
    let data = tempfile::tempdir().unwrap();
    let (id, key) = create_key(data.path(), "acme");
    let s = Server::start(data.path(), None);
    let raw = |body: &'static str| {
        let s = &s;
        let key = key.clone();
        async move {
            let r = client()
                .post(s.url("/v1/chat/completions"))
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, b) = raw("{not json").await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (st, b) = post(
        &s,
        &key,
        "/v1/chat/completions",
        json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "temprature": 1}),
    )
    .await;
    assert_eq!(
        (
            st,
            b["error"]["code"].as_str(),
            b["error"]["param"].as_str()
        ),
        (400, Some("unknown_parameter"), Some("temprature"))
    );
    let (st, b) = post(
        &s,
        &key,
        "/v1/chat/completions",
        json!({"model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(
        (st, b["error"]["code"].as_str(), b["error"]["type"].as_str()),
        (404, Some("model_not_found"), Some("not_found_error"))
    );
    let (st, b) = post(
        &s,
        &key,
        "/v1/chat/completions",
        json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "n": 3}),
    )
    .await;
    assert_eq!((st, b["error"]["param"].as_str()), (400, Some("n")));
    let long = "word ".repeat(20_000);
    let (st, b) = post(
        &s,
        &key,
        "/v1/chat/completions",
        json!({"model": CHAT, "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(st, 400, "a prompt over the context: {b}");
    let huge = "x".repeat(3 * 1024 * 1024);
    let (st, b) = post(
        &s,
        &key,
        "/v1/chat/completions",
        json!({"model": CHAT, "messages": [{"role": "user", "content": huge}]}),
    )
    .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (st, b) = post(
        &s,
        &key,
        "/v1/embeddings",
        json!({"model": EMBED, "input": "x", "dimensions": 10}),
    )
    .await;
    assert_eq!(
        (st, b["error"]["param"].as_str()),
        (400, Some("dimensions"))
    );
    let (st, b) = post(
        &s,
        &key,
        "/v1/embeddings",
        json!({"model": EMBED, "input": ["short", "word ".repeat(600)]}),
    )
    .await;
    assert_eq!(
        (
            st,
            b["error"]["code"].as_str(),
            b["error"]["param"].as_str()
        ),
        (400, Some("input_too_long"), Some("input[1]")),
        "{b}"
    );
    // Keys: none, a wrong one, then one revoked while the node runs.
    let r = client().get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(s.url("/v1/models"))
        .bearer_auth("sk-soma-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let out = soma(data.path())
        .args(["keys", "revoke", &id])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r = client()
        .get(s.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "revoked_api_key"
    );
    // Outside /v1: problem+json.
    let r = client().get(s.url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "route_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "acme");
    let (_, other) = create_key(data.path(), "beta");
    let config = data.path().join("soma.toml");
    let (_, second) = create_key(data.path(), "acme");
    let (_, third) = create_key(data.path(), "acme");
    std::fs::write(
        &config,
        "[gateway]\nrate_limit_per_minute = 2\nrate_limit_burst = 2\n[tenants.defaults.quotas]\nrequests_per_minute = 2\n",
    )
    .unwrap();
    let s = Server::start(data.path(), Some(&config));
    let get = |k: String| {
        let s = &s;
        async move {
            client()
                .get(s.url("/v1/models"))
                .bearer_auth(k)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(get(key.clone()).await.status(), 200);
    assert_eq!(get(key.clone()).await.status(), 200);
    let r = get(key.clone()).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "rate_limit_error"
    );
    // Another key is not limited by the first one's use.
    assert_eq!(get(other).await.status(), 200);
    // The tenant's own quota counts model calls over all its keys.
    let embed = |k: String| {
        let s = &s;
        async move {
            post(
                s,
                &k,
                "/v1/embeddings",
                json!({"model": EMBED, "input": "x"}),
            )
            .await
        }
    };
    assert_eq!(embed(second.clone()).await.0, 200);
    assert_eq!(embed(second).await.0, 200);
    let (status, body) = embed(third).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("tenant_rate_limit_exceeded")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_calls_pass_the_tenants_constitution_and_are_metered() {
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "acme");
    let (_, other) = create_key(data.path(), "beta");
    let config = data.path().join("soma.toml");
    std::fs::write(&config, "[tenants.defaults.quotas]\ntokens_per_day = 100\n").unwrap();
    let s = Server::start(data.path(), Some(&config));
    // Each call: some 32 prompt tokens and 12 generated; the quota is checked before a call.
    let mut spent = 0;
    let mut denied = None;
    for _ in 0..6 {
        let (status, body) = post(
            &s,
            &key,
            "/v1/chat/completions",
            chat("Name three colours.", 12),
        )
        .await;
        if status == 200 {
            spent += body["usage"]["total_tokens"].as_u64().unwrap();
            continue;
        }
        denied = Some((status, body));
        break;
    }
    let (status, body) = denied.expect("the quota was never enforced");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "policy_denied");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daily token quota of 100"),
        "{body}"
    );
    assert!(spent >= 100, "denied only once the quota was used: {spent}");
    // Streams cut by their client are metered for what they cost, too: a fresh tenant
    // whose four cut streams (each some 32 prompt tokens and at least one generated) pass
    // its quota of 100 is denied next.
    let (_, gamma) = create_key(data.path(), "gamma");
    for _ in 0..4 {
        let r = open_stream(&s, &gamma, chat("Tell a very long story.", 60)).await;
        if r.status() == 403 {
            // The streams cut so far already used the quota up.
            break;
        }
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let mut seen = String::new();
        while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 3 {
            seen.push_str(&String::from_utf8_lossy(
                &body.next().await.unwrap().unwrap(),
            ));
        }
        drop(body);
    }
    // Wait (bounded) until the cut streams are in the tenant's usage, then one request.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = client()
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let tokens_in: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("soma_tenant_tokens_total{")
                    && l.contains("tenant=\"gamma\"")
                    && l.contains("direction=\"in\"")
            })
            .filter_map(|l| l.rsplit(" ").next()?.parse::<f64>().ok())
            .sum();
        if tokens_in >= 100.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cut streams were never metered ({tokens_in} tokens)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = post(&s, &gamma, "/v1/chat/completions", chat("hi", 2)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("policy_denied")),
        "{body}"
    );
    // Embeddings are model calls too; another tenant is not affected.
    let (status, _) = post(
        &s,
        &key,
        "/v1/embeddings",
        json!({"model": EMBED, "input": "x"}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = post(
        &s,
        &other,
        "/v1/chat/completions",
        chat("Name three colours.", 12),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_with_a_final_event_and_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let (_, key) = create_key(data.path(), "acme");
    let s = Server::start(data.path(), None);
    let r = stream(&s, &key, chat("Tell a very long story.", 4000)).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));
    let reader = tokio::spawn(async move {
        let mut rest = String::new();
        while let Some(c) = body.next().await {
            rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
        }
        rest
    });
    let (status, lines) = tokio::task::spawn_blocking(move || s.terminate())
        .await
        .unwrap();
    let rest = reader.await.unwrap();
    assert!(rest.contains("\"code\":\"shutting_down\""), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(status.success(), "exit status {status}");
    assert_eq!(lines.last().map(String::as_str), Some("stopped"));
}

#[test]
fn configuration_is_file_then_environment_then_flags_and_errors_name_the_key() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("soma.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9000\"\n[gateway]\nrate_limit_per_minute = 5\n",
    )
    .unwrap();
    let print = |envs: &[(&str, &str)], args: &[&str]| {
        let mut c = soma(data.path());
        c.args(["config", "print", "--config"])
            .arg(&file)
            .args(args);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = print(&[], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9000\""), "{text}");
    assert!(text.contains("rate_limit_per_minute = 5"), "{text}");
    let out = print(
        &[
            ("SOMA_LISTEN", "127.0.0.1:9001"),
            ("SOMA_GATEWAY_RATE_LIMIT_PER_MINUTE", "7"),
        ],
        &[],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("127.0.0.1:9001") && text.contains("rate_limit_per_minute = 7"),
        "{text}"
    );
    let out = print(
        &[("SOMA_LISTEN", "127.0.0.1:9001")],
        &["--listen", "127.0.0.1:9002"],
    );
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("127.0.0.1:9002")
    );
    // A bad environment value names the variable.
    let out = print(&[("SOMA_GATEWAY_RATE_LIMIT_PER_MINUTE", "many")], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("SOMA_GATEWAY_RATE_LIMIT_PER_MINUTE") && err.contains("many"),
        "{err}"
    );
    // An unknown key in the file names the key and the file.
    std::fs::write(&file, "[gateway]\nrate_limit = 5\n").unwrap();
    let out = print(&[], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("rate_limit") && err.contains("soma.toml"),
        "{err}"
    );
    // A pool setting: by its key under models.
    std::fs::write(&file, "[models.generator]\nreplicas = 2\n").unwrap();
    let text = String::from_utf8(print(&[], &[]).stdout).unwrap();
    assert!(text.contains("replicas = 2"), "{text}");
    let err =
        String::from_utf8(print(&[("SOMA_MODELS_GENERATOR_REPLICAS", "0")], &[]).stderr).unwrap();
    assert!(err.contains("models.generator.replicas"), "{err}");
    std::fs::write(&file, "[models.embedder]\nmax_wait = 5\n").unwrap();
    let err = String::from_utf8(print(&[], &[]).stderr).unwrap();
    assert!(
        err.contains("max_wait") && err.contains("soma.toml"),
        "{err}"
    );
    // So does a bad value of the inference pool's variable, at start.
    let out = soma(data.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SOMA_INFERENCE_ISA", "avx9000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("SOMA_INFERENCE_ISA") && err.contains("avx9000"),
        "{err}"
    );
    // A value out of range names its key.
    std::fs::write(&file, "listen = \"nowhere\"\n").unwrap();
    let err = String::from_utf8(print(&[], &[]).stderr).unwrap();
    assert!(err.contains("listen") && err.contains("nowhere"), "{err}");
}
