//! P5: durable messages/s through the Redis journal (256 concurrent senders over 64 keys,
//! 128-byte messages; a send returns once its group-commit batch is on the server's disk,
//! then every message is handled and committed), against `redis-benchmark` XADD of the same
//! payload with 64 clients, on the same redis-server (append-only, fsync always), alternating.
//!
//! `cargo bench --bench p5_redis_journal`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod common;
#[path = "../adapters/tests/common/mod.rs"]
mod servers;

use std::process::Command;
use std::sync::Arc;

use common::{Sink, bench_options, median, rate};
use soma::{Runtime, RuntimeOptions};
use soma_cluster::{RedisJournal, RedisOptions};

const SENDERS: u64 = 256;
const PER_SENDER: u64 = 400;
const KEYS: u64 = 64;
const MESSAGE: usize = 128;
const ROUNDS: usize = 3;

/// (acknowledged msg/s, handled msg/s, mean batch).
async fn ours(url: &str, round: usize) -> (f64, f64, f64) {
    let journal = RedisJournal::open(RedisOptions::new(url, format!("p5-{round}"), "bench"))
        .await
        .unwrap();
    let rt = Runtime::with_journal(Arc::new(journal), &RuntimeOptions::new("unused"))
        .await
        .unwrap();
    let reg = rt.registry(Sink, bench_options("sink")).await.unwrap();
    let payload = vec![7u8; MESSAGE - 3]; // bincode adds a 1-3 byte length
    let (acked, handled) = common::send_load(&reg, SENDERS, PER_SENDER, KEYS, &payload).await;
    let stats = rt.writer_stats();
    reg.stop().await;
    rt.shutdown().await.unwrap();
    let total = SENDERS * PER_SENDER;
    (rate(total, acked), rate(total, handled), stats.mean_batch())
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = servers::RedisServer::start();
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
