//! Redis episodic memory: appends per second through `RedisEpisodic` (INCR for the id, then
//! ZADD + 2 SADD in one MULTI/EXEC), 64 concurrent appenders, against `redis-benchmark`
//! (ZADD, 64 clients) on the same redis-server (append-only, fsync always), run side by side.
//!
//! `cargo bench -p soma-adapters --features redis --bench episodic_redis`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use soma_adapters::{Entry, EpisodicMemory, RedisEpisodic, Scope};

const TASKS: u64 = 64;
const PER_TASK: u64 = 800;
const ROUNDS: usize = 3;

async fn ours(url: &str, round: usize) -> f64 {
    let m = Arc::new(
        RedisEpisodic::connect(url, &format!("bench{round}"))
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let m = m.clone();
            tokio::spawn(async move {
                let scope = Scope::new("acme", format!("session-{t}")).unwrap();
                for n in 0..PER_TASK {
                    let entry = Entry {
                        at_ms: 1_700_000_000_000 + n,
                        role: "user".into(),
                        content: "a message of about sixty bytes, as a chat turn might be".into(),
                        metadata: serde_json::Value::Null,
                    };
                    m.append(&scope, entry).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (TASKS * PER_TASK) as f64 / started.elapsed().as_secs_f64()
}

fn redis_benchmark(port: u16) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "zadd", "-c", "64", "-d", "100", "-q"])
        .args(["-n", &(TASKS * PER_TASK).to_string()])
        .output()
        .expect("redis-benchmark (Debian package redis-tools) is missing");
    let text = String::from_utf8_lossy(&out.stdout);
    // "ZADD: 41234.57 requests per second, p50=1.2 msec"
    text.rsplit("ZADD:")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read redis-benchmark's output: {text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = common::RedisServer::start();
    let (mut a, mut b) = (vec![], vec![]);
    for round in 0..ROUNDS {
        let peer = redis_benchmark(server.port);
        let mine = ours(&server.url(), round).await;
        println!(
            "round {round}: RedisEpisodic {mine:.0} appends/s, redis-benchmark ZADD {peer:.0}/s"
        );
        a.push(mine);
        b.push(peer);
    }
    let (a, b) = (median(a), median(b));
    println!(
        "episodic appends: RedisEpisodic {a:.0}/s vs redis-benchmark ZADD {b:.0}/s \
         (median of {ROUNDS}); ratio {:.2}x (each append is 2 round trips and 3 writes)",
        a / b
    );
}
