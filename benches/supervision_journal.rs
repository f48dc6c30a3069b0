//! P2: durable messages/s through the sled journal with flushed group commit, 256 concurrent
//! senders, 128-byte messages; against raw sled doing `apply_batch` + `flush` of the same
//! bytes at the batch size the journal reached.
//!
//! `cargo bench --bench supervision_journal`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Instant;

use common::{Sink, bench_options, fmt_rate, median, rate};
use soma::{Runtime, RuntimeOptions};

const SENDERS: u64 = 256;
const PER_SENDER: u64 = 800;
const KEYS: u64 = 64;
const MESSAGE: usize = 128;
const ROUNDS: usize = 3;

/// Returns (acknowledged msg/s, handled msg/s, mean batch, bytes written per message).
async fn durable(dir: &std::path::Path) -> (f64, f64, f64, f64) {
    let written = common::write_bytes();
    let rt = Runtime::open(RuntimeOptions::new(dir.join("journal")))
        .await
        .unwrap();
    let reg = rt.registry(Sink, bench_options("sink")).await.unwrap();
    let payload = vec![7u8; MESSAGE - 3]; // bincode adds a 1-3 byte length
    let (acked, handled) = common::send_load(&reg, SENDERS, PER_SENDER, KEYS, &payload).await;
    let total = SENDERS * PER_SENDER;
    let stats = rt.writer_stats();
    let per_msg = (common::write_bytes() - written) as f64 / total as f64;
    reg.stop().await;
    (
        rate(total, acked),
        rate(total, handled),
        stats.mean_batch(),
        per_msg,
    )
}

/// Raw sled: the same number of 128-byte records in batches of `batch`, each batch applied
/// and flushed. Returns (msg/s, bytes written per message).
fn raw_sled(dir: &std::path::Path, batch: usize) -> (f64, f64) {
    let written = common::write_bytes();
    let db = sled::Config::new()
        .path(dir.join("raw"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    let total = (SENDERS * PER_SENDER) as usize;
    let value = vec![7u8; MESSAGE + 4];
    let started = Instant::now();
    let mut n = 0usize;
    while n < total {
        let mut b = sled::Batch::default();
        for _ in 0..batch.min(total - n) {
            let mut key = b"ik12\0".to_vec();
            key.extend_from_slice(&(n as u64).to_be_bytes());
            b.insert(key, value.clone());
            n += 1;
        }
        db.apply_batch(b).unwrap();
        db.flush().unwrap();
    }
    let took = started.elapsed();
    let per_msg = (common::write_bytes() - written) as f64 / total as f64;
    (rate(total as u64, took), per_msg)
}

fn main() {
    println!("P2 durable throughput, {}", common::machine());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut acked = Vec::new();
    let mut handled = Vec::new();
    let mut raw = Vec::new();
    let mut batches = Vec::new();
    let mut bytes = Vec::new();
    let mut raw_bytes = Vec::new();
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let (a, h, b, w) = rt.block_on(durable(dir.path()));
        bytes.push(w);
        acked.push(a);
        handled.push(h);
        batches.push(b);
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = raw_sled(dir.path(), b.round().max(1.0) as usize);
        raw.push(r);
        raw_bytes.push(w);
    }
    let (a, h, r, b) = (median(acked), median(handled), median(raw), median(batches));
    println!(
        "senders {SENDERS}, keys {KEYS}, message {MESSAGE} B, {} messages per run",
        SENDERS * PER_SENDER
    );
    println!(
        "{:<46} {:>12}",
        "soma durable sends acknowledged, msg/s",
        fmt_rate(a)
    );
    println!(
        "{:<46} {:>12}",
        "soma durable sends handled + committed, msg/s",
        fmt_rate(h)
    );
    println!("{:<46} {:>12.1}", "mean group-commit batch", b);
    println!(
        "{:<46} {:>12}",
        "raw sled apply_batch+flush at that batch, msg/s",
        fmt_rate(r)
    );
    println!(
        "{:<46} {:>12.0} {:>12.0}",
        "bytes written per message: soma, raw sled",
        median(bytes),
        median(raw_bytes)
    );
    println!(
        "ratio soma / raw sled at equal batch: {:.2}x (acknowledged)",
        a / r
    );
}
