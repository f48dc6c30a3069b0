//! P6: idle durable actors on one node. 1M actors are each activated by a message, handle it,
//! and passivate; then the process's RSS is measured (the peer: Akka's claim of 2.5M
//! in-memory actors per GB), and cold activations of random passivated actors are timed.
//!
//! `cargo bench --bench supervision_idle`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Instant;

use common::{Sink, fmt_rate, rate, rss_bytes};
use hdrhistogram::Histogram;
use soma::{Runtime, RuntimeOptions};

const ACTORS: u64 = 1_000_000;
const WAVE: u64 = 20_000;
const COLD_SAMPLES: u64 = 10_000;
const AKKA_ACTORS_PER_GB: f64 = 2_500_000.0;

fn main() {
    println!("P6 {ACTORS} idle durable actors, {}", common::machine());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let base_rss = rss_bytes();
        let mut options = RuntimeOptions::new(dir.path().join("journal"));
        options.journal.cache_capacity_bytes = 64 * 1024 * 1024;
        let runtime = Runtime::open(options).await.unwrap();
        let mut opts = common::bench_options("idle");
        opts.passivate_after_ms = Some(200);
        let reg = runtime.registry(Sink, opts).await.unwrap();
        let started = Instant::now();
        let mut wave = 0;
        while wave < ACTORS {
            let sends: Vec<_> = (wave..(wave + WAVE).min(ACTORS))
                .map(|i| {
                    let reg = reg.clone();
                    tokio::spawn(async move {
                        let key = format!("actor/{i}");
                        let seq = reg.send(&key, &vec![1u8; 16]).await.unwrap();
                        reg.wait_handled(&key, seq).await.unwrap();
                    })
                })
                .collect();
            for s in sends {
                s.await.unwrap();
            }
            wave += WAVE;
        }
        let created = started.elapsed();
        // Wait until every actor has passivated.
        while reg.live() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let rss = rss_bytes();
        let per_gb = ACTORS as f64 / ((rss.saturating_sub(base_rss)) as f64 / 1e9);
        // Cold activations of random passivated actors.
        let mut h = Histogram::<u64>::new(3).unwrap();
        for _ in 0..COLD_SAMPLES {
            let key = format!("actor/{}", fastrand::u64(0..ACTORS));
            let t = Instant::now();
            reg.activate(&key).await.unwrap();
            h.record((t.elapsed().as_nanos() as u64).max(1)).unwrap();
        }
        println!(
            "activated, handled and passivated {ACTORS} actors in {:.1} s ({} actors/s)",
            created.as_secs_f64(),
            fmt_rate(rate(ACTORS, created))
        );
        println!(
            "RSS with {ACTORS} passivated actors: {:.0} MiB (process growth {:.0} MiB)",
            rss as f64 / 1048576.0,
            (rss.saturating_sub(base_rss)) as f64 / 1048576.0
        );
        println!(
            "cold activation: p50 {:.3} ms, p99 {:.3} ms (target p99 < 1 ms: {})",
            h.value_at_quantile(0.5) as f64 / 1e6,
            h.value_at_quantile(0.99) as f64 / 1e6,
            if h.value_at_quantile(0.99) < 1_000_000 {
                "met"
            } else {
                "missed"
            }
        );
        println!(
            "ratio passivated actors per GB vs Akka's 2.5M in-memory actors per GB: {:.2}x",
            per_gb / AKKA_ACTORS_PER_GB
        );
    });
}
