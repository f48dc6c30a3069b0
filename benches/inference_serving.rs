//! P14: serving concurrent streaming chats. `soma serve` (continuous batching on the native
//! engine) against llama.cpp's OpenAI-compatible server (`llama_cpp.server` from
//! llama-cpp-python) on the same GGUF and thread count, one load generator hitting each in
//! turn over HTTP with 1, 8 and 32 concurrent streaming chats (each client runs `ROUNDS` chats
//! one after the other, greedy, `MAX_TOKENS` each). Prints aggregate completion tokens/s and
//! time to first token (p50, p99) of both, and the ratios.
//!
//! `cargo bench --bench inference_serving` (peer: `bash benches/peers/install.sh`; threads:
//! `P14_THREADS`, default 2; `P14_ONLY=soma` runs only ours).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct";
const MAX_TOKENS: u64 = 64;
const ROUNDS: usize = 2;
const LEVELS: [usize; 3] = [1, 8, 32];

const TOPICS: [&str; 8] = [
    "a lighthouse keeper",
    "a lost cat",
    "the first day of school",
    "a storm at sea",
    "a robot that learns to paint",
    "a dragon who is afraid of fire",
    "a train journey",
    "a garden in winter",
];

fn models() -> PathBuf {
    std::env::var_os("SOMA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    base: String,
    key: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn soma(data: &Path, threads: usize) -> Server {
    let soma = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_soma"));
        c.args(args)
            .env("SOMA_DATA", data)
            .env("SOMA_MODELS", models())
            .env("CANDLE_NUM_THREADS", threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env_remove("SOMA_LISTEN");
        c
    };
    let out = soma(&["keys", "create", "--tenant", "bench"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let config = data.join("soma.toml");
    std::fs::write(
        &config,
        "[models.generator]\nmax_batch = 32\n[gateway]\nrate_limit_per_minute = 100000\nrate_limit_burst = 10000\n[tenants.defaults.quotas]\nrequests_per_minute = 100000\n",
    )
    .unwrap();
    let mut child = soma(&["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("soma serve printed its address");
    Server {
        child,
        base,
        key: Some(key),
    }
}

fn llama(gguf: &Path, threads: usize) -> Option<Server> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/.venv/bin/python");
    if !python.exists() {
        println!("llama.cpp peer not installed: run `bash benches/peers/install.sh`");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = threads.to_string();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(gguf)
        .args([
            "--model_alias",
            MODEL,
            "--n_threads",
            &t,
            "--n_threads_batch",
            &t,
        ])
        .args([
            "--n_ctx",
            "4096",
            // By default a new request interrupts the one being generated; a server under
            // several clients must finish each.
            "--interrupt_requests",
            "False",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Some(Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        key: None,
    })
}

/// Waits until the server answers `/v1/models`.
async fn ready(client: &reqwest::Client, s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut req = client.get(format!("{}/v1/models", s.base));
        if let Some(k) = &s.key {
            req = req.bearer_auth(k);
        }
        if let Ok(r) = req.send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{} did not come up", s.base);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One streamed chat: (time to first content, completion tokens).
async fn chat(client: &reqwest::Client, s: &Server, prompt: &str) -> (Duration, u64) {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = client
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body);
    if let Some(k) = &s.key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{}: {}", s.base, resp.status());
    let mut first = None;
    let (mut chunks, mut usage) = (0u64, None);
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(part) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&part.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                chunks += 1;
                first.get_or_insert_with(|| start.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n);
            }
        }
    }
    (
        first.unwrap_or_else(|| start.elapsed()),
        usage.unwrap_or(chunks),
    )
}

/// Aggregate tokens/s, TTFT p50 and p99 (ms) of one concurrency level.
type Row = (f64, f64, f64);

/// How to start one of the servers compared.
type Start<'a> = Box<dyn Fn() -> Option<Server> + 'a>;

/// Aggregate tokens/s and TTFT p50/p99 (ms) with `clients` concurrent clients.
async fn level(client: &reqwest::Client, s: &Server, clients: usize) -> Row {
    let start = Instant::now();
    let runs = (0..clients).map(|c| async move {
        let mut out = Vec::new();
        for r in 0..ROUNDS {
            let topic = TOPICS[(c + r) % TOPICS.len()];
            out.push(chat(client, s, &format!("Write a short story about {topic}.")).await);
        }
        out
    });
    let results: Vec<(Duration, u64)> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    let wall = start.elapsed().as_secs_f64();
    let tokens: u64 = results.iter().map(|r| r.1).sum();
    let mut ttft: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64() * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    let pct = |p: f64| ttft[((ttft.len() as f64 * p).ceil() as usize).clamp(1, ttft.len()) - 1];
    (tokens as f64 / wall, pct(0.5), pct(0.99))
}

fn main() {
    let threads: usize = std::env::var("P14_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let only = std::env::var("P14_ONLY").ok();
    let gguf = models().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    println!(
        "P14 serving: {} ({threads} thread(s), {MAX_TOKENS} tokens greedy, {ROUNDS} chats per client)",
        gguf.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut figures: Vec<(&str, Vec<Row>)> = Vec::new();
    // One server at a time, so that each has the machine to itself.
    let data = tempfile::tempdir().unwrap();
    let mut servers: Vec<(&str, Start)> =
        vec![("soma serve", Box::new(|| Some(soma(data.path(), threads))))];
    if only.as_deref() != Some("soma") {
        let gguf = gguf.clone();
        servers.push(("llama_cpp.server", Box::new(move || llama(&gguf, threads))));
    }
    for (name, start) in servers {
        let Some(server) = start() else { continue };
        let rows = rt.block_on(async {
            ready(&client, &server).await;
            // Warm-up: one chat.
            chat(&client, &server, "Say hello.").await;
            let mut rows = Vec::new();
            for clients in LEVELS {
                let row = level(&client, &server, clients).await;
                println!(
                    "{name:>18}: {clients:>2} streams: {:>7.1} tokens/s, first token p50 {:>7.1} ms, p99 {:>7.1} ms",
                    row.0, row.1, row.2
                );
                rows.push(row);
            }
            rows
        });
        drop(server);
        figures.push((name, rows));
    }
    if let [(_, ours), (_, theirs)] = figures.as_slice() {
        for (i, clients) in LEVELS.iter().enumerate() {
            println!(
                "ratio at {clients:>2} streams: tokens/s {:.2}x llama.cpp (target >= 2x at 8 and 32); first token p99 {:.2}x theirs (lower is better)",
                ours[i].0 / theirs[i].0,
                ours[i].2 / theirs[i].2
            );
        }
    }
}
