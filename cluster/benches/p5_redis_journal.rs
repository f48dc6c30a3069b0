//! P5: durable messages/s through the Redis journal (256 concurrent senders over 64 keys,
//! 128-byte messages; a send returns once its group-commit batch is on the server's disk,
//! then every message is handled and committed), against `redis-benchmark` XADD of the same
//! payload with 64 clients, on the same redis-server (append-only, fsync always), alternating.
//!
//! `cargo bench -p soma-cluster --bench p5_redis_journal`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "../../adapters/tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use soma_cluster::{RedisJournal, RedisOptions};
use soma_supervision::{
    Context, DurableActor, HandlerError, RegistryOptions, Runtime, RuntimeOptions,
};

const SENDERS: u64 = 256;
const PER_SENDER: u64 = 400;
const KEYS: u64 = 64;
const MESSAGE: usize = 128;
const ROUNDS: usize = 3;

struct Sink;

impl DurableActor for Sink {
    type Msg = Vec<u8>;
    type State = u64;

    fn init(&self, _key: &str) -> u64 {
        0
    }

    async fn handle(
        &self,
        _ctx: &mut Context<Vec<u8>>,
        count: &mut u64,
        _msg: Vec<u8>,
    ) -> Result<(), HandlerError> {
        *count += 1;
        Ok(())
    }
}

/// (acknowledged msg/s, handled msg/s, mean batch).
async fn ours(url: &str, round: usize) -> (f64, f64, f64) {
    let journal = RedisJournal::open(RedisOptions::new(url, format!("p5-{round}"), "bench"))
        .await
        .unwrap();
    let rt = Runtime::with_journal(Arc::new(journal), &RuntimeOptions::new("unused"))
        .await
        .unwrap();
    let mut options = RegistryOptions::new("sink");
    options.max_in_flight = 1 << 20;
    options.passivate_after_ms = None;
    let reg = rt.registry(Sink, options).await.unwrap();
    let payload = vec![7u8; MESSAGE - 3]; // bincode adds a 1-3 byte length
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let reg = reg.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let key = format!("k{}", s % KEYS);
                let mut last = 0;
                for _ in 0..PER_SENDER {
                    last = reg.send(&key, &payload).await.unwrap();
                }
                (key, last)
            })
        })
        .collect();
    let mut lasts = std::collections::BTreeMap::new();
    for s in senders {
        let (key, last) = s.await.unwrap();
        let e = lasts.entry(key).or_insert(0);
        *e = (*e).max(last);
    }
    let acked = started.elapsed();
    for (key, last) in &lasts {
        reg.wait_handled(key, *last).await.unwrap();
    }
    let handled = started.elapsed();
    let total = (SENDERS * PER_SENDER) as f64;
    let stats = rt.writer_stats();
    reg.stop().await;
    rt.shutdown().await.unwrap();
    (
        total / acked.as_secs_f64(),
        total / handled.as_secs_f64(),
        stats.mean_batch(),
    )
}

fn redis_benchmark(port: u16) -> f64 {
    let payload = "x".repeat(MESSAGE);
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "64", "-q"])
        .args(["-n", &(SENDERS * PER_SENDER).to_string()])
        .args(["XADD", "p5:peer", "*", "p", &payload])
        .output()
        .expect("redis-benchmark (Debian package redis-tools) is missing");
    let text = String::from_utf8_lossy(&out.stdout);
    // "XADD p5:peer * p xxx...: 41234.57 requests per second, p50=1.2 msec"
    text.rsplit(": ")
        .find_map(|s| {
            s.strip_suffix('\n')
                .unwrap_or(s)
                .split(" requests per second")
                .next()
                .and_then(|n| n.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("cannot read redis-benchmark's output: {text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = common::RedisServer::start();
    let (mut acked, mut handled, mut peer) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let p = redis_benchmark(server.port);
        let (a, h, batch) = ours(&server.url(), round).await;
        println!(
            "round {round}: soma acknowledged {a:.0} msg/s, handled + committed {h:.0} msg/s \
             (mean batch {batch:.1}); redis-benchmark XADD {p:.0}/s"
        );
        acked.push(a);
        handled.push(h);
        peer.push(p);
    }
    let (a, h, p) = (median(acked), median(handled), median(peer));
    println!(
        "P5 durable msg/s through the Redis journal: acknowledged {a:.0}, handled {h:.0}; \
         redis-benchmark XADD {p:.0}/s (median of {ROUNDS}); ratio {:.2}x acknowledged, \
         {:.2}x handled (target >= 0.5x)",
        a / p,
        h / p
    );
}
