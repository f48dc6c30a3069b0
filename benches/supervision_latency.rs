//! P3: durable send latency at 10k msg/s (open loop), against the fsync latency of the same
//! disk.
//!
//! `cargo bench --bench supervision_latency`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Sink, bench_options};
use hdrhistogram::Histogram;
use soma::{Runtime, RuntimeOptions};

const RATE_PER_S: u64 = 10_000;
const SECONDS: u64 = 5;
const TICK_MS: u64 = 1;

async fn durable(dir: &std::path::Path) -> Histogram<u64> {
    let rt = Runtime::open(RuntimeOptions::new(dir.join("journal")))
        .await
        .unwrap();
    let reg = rt.registry(Sink, bench_options("sink")).await.unwrap();
    let payload = vec![7u8; 125];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let per_tick = RATE_PER_S * TICK_MS / 1000;
    let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let ticks = SECONDS * 1000 / TICK_MS;
    for t in 0..ticks {
        ticker.tick().await;
        for i in 0..per_tick {
            let reg = reg.clone();
            let payload = payload.clone();
            let tx = tx.clone();
            let key = format!("k{}", (t * per_tick + i) % 64);
            tokio::spawn(async move {
                let started = Instant::now();
                reg.send(&key, &payload).await.unwrap();
                let _ = tx.send(started.elapsed().as_micros() as u64);
            });
        }
    }
    drop(tx);
    let mut h = Histogram::<u64>::new(3).unwrap();
    while let Some(us) = rx.recv().await {
        h.record(us.max(1)).unwrap();
    }
    reg.stop().await;
    h
}

fn fsync(dir: &std::path::Path) -> Histogram<u64> {
    let mut f = std::fs::File::create(dir.join("fsync")).unwrap();
    let block = vec![1u8; 4096];
    let mut h = Histogram::<u64>::new(3).unwrap();
    for _ in 0..5000 {
        let started = Instant::now();
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        h.record((started.elapsed().as_micros() as u64).max(1))
            .unwrap();
    }
    h
}

fn main() {
    println!(
        "P3 durable send latency at {RATE_PER_S} msg/s, {}",
        common::machine()
    );
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f1 = fsync(dir.path());
    let d = multi.block_on(durable(&dir.path().join("multi")));
    let c = current.block_on(durable(&dir.path().join("current")));
    let f2 = fsync(dir.path());
    let mut f = f1;
    f.add(&f2).unwrap();
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "p99.9 ms", "count"
    );
    for (name, h) in [
        ("soma durable send, multi-thread", &d),
        ("soma durable send, current-thread", &c),
    ] {
        println!(
            "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>9}",
            name,
            q(h, 0.5),
            q(h, 0.99),
            q(h, 0.999),
            h.len()
        );
    }
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>9}",
        "4 KiB write + fdatasync (same disk)",
        q(&f, 0.5),
        q(&f, 0.99),
        q(&f, 0.999),
        f.len()
    );
    let best = q(&d, 0.99).min(q(&c, 0.99));
    println!(
        "target p99 <= 2 ms: {}; ratio p99 send (best runtime) / p99 fsync: {:.2}x",
        if best <= 2.0 { "met" } else { "missed" },
        best / q(&f, 0.99)
    );
}
