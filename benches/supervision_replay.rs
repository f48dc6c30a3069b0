//! P4: replay after a crash with 1M unacknowledged messages: messages replayed per second,
//! and the time from process start (journal open) to the first message handled.
//!
//! The journal is filled with 1M appended, unhandled messages, then closed: the same state a
//! SIGKILL leaves (every acknowledged message flushed, none handled). Two shapes: 1,000 keys
//! with 1,000 messages each, and one key with all of them.
//!
//! `cargo bench --bench supervision_replay`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fmt_rate, rate};
use soma::supervision::{Append, Bytes, Journal, SledJournal, SledOptions};
use soma::{Context, DurableActor, HandlerError, RegistryOptions, Runtime, RuntimeOptions};

const TOTAL: u64 = 1_000_000;

/// When the current run handled its first message.
static FIRST: Mutex<Option<Instant>> = Mutex::new(None);

struct Replayer;

impl DurableActor for Replayer {
    type Msg = Vec<u8>;
    type State = u64;

    fn init(&self, _key: &str) -> u64 {
        0
    }

    async fn handle(
        &self,
        _ctx: &mut Context<Vec<u8>>,
        n: &mut u64,
        _msg: Vec<u8>,
    ) -> Result<(), HandlerError> {
        FIRST.lock().unwrap().get_or_insert_with(Instant::now);
        *n += 1;
        Ok(())
    }
}

async fn fill(path: &std::path::Path, keys: u64) {
    let j = SledJournal::open(SledOptions::new(path)).unwrap();
    let mut epochs = std::collections::HashMap::new();
    for r in 0..j.ranges() {
        epochs.insert(r, j.acquire(soma::supervision::KeyRange(r)).await.unwrap());
    }
    // bincode of a Vec<u8> of 125 bytes: the length, then the bytes.
    let mut encoded = vec![125u8];
    encoded.extend_from_slice(&[0x7du8; 125]);
    let encoded = Bytes::from(encoded);
    let jkeys: Vec<Arc<str>> = (0..keys)
        .map(|k| Arc::from(format!("replay\u{1f}k{k}")))
        .collect();
    let mut n = 0;
    while n < TOTAL {
        let batch: Vec<Append> = (0..4096.min(TOTAL - n))
            .map(|i| {
                let key = jkeys[((n + i) % keys) as usize].clone();
                let epoch = epochs[&j.range_of(&key).0];
                Append {
                    key,
                    payload: encoded.clone(),
                    epoch,
                }
            })
            .collect();
        n += batch.len() as u64;
        j.append(&batch).await.unwrap();
    }
}

struct Result1 {
    open: Duration,
    first: Duration,
    all: Duration,
}

async fn replay(path: &std::path::Path, keys: u64) -> Result1 {
    *FIRST.lock().unwrap() = None;
    let started = Instant::now();
    let rt = Runtime::open(RuntimeOptions::new(path)).await.unwrap();
    let open = started.elapsed();
    let mut opts = RegistryOptions::new("replay");
    opts.passivate_after_ms = None;
    let reg = rt.registry(Replayer, opts).await.unwrap();
    let per_key = TOTAL / keys;
    for k in 0..keys {
        reg.wait_handled(&format!("k{k}"), per_key).await.unwrap();
    }
    let all = started.elapsed();
    let first = FIRST
        .lock()
        .unwrap()
        .map_or(all, |t| t.duration_since(started));
    let handled: u64 = {
        let mut s = 0;
        for k in 0..keys {
            s += reg.state(&format!("k{k}")).await.unwrap();
        }
        s
    };
    assert_eq!(handled, TOTAL, "every message replayed exactly once");
    Result1 { open, first, all }
}

fn main() {
    // RUST_LOG=soma_supervision=debug shows the journal open's phases.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    println!(
        "P4 replay of {TOTAL} unacknowledged messages, {}",
        common::machine()
    );
    for keys in [1_000u64, 1] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let fill_rt = tokio::runtime::Runtime::new().unwrap();
        fill_rt.block_on(fill(&path, keys));
        drop(fill_rt);
        // A restarted process finds no one holding the state store; here sled's threads let
        // go of its lock a moment after the filling journal is dropped (an open meanwhile
        // waits for them): start the clock once they have, as a new process would.
        std::thread::sleep(Duration::from_millis(500));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(replay(&path, keys));
        let replay_rate = rate(TOTAL, r.all);
        println!(
            "{keys:>5} keys: journal open {:>7.1} ms, first handled {:>7.1} ms after start, all {:>7.2} s, {} msg/s replayed",
            r.open.as_secs_f64() * 1e3,
            r.first.as_secs_f64() * 1e3,
            r.all.as_secs_f64(),
            fmt_rate(replay_rate)
        );
        println!(
            "{keys:>5} keys: ratio to target 500k msg/s: {:.2}x; first message target 100 ms: {}",
            replay_rate / 500_000.0,
            if r.first <= Duration::from_millis(100) {
                "met"
            } else {
                "missed"
            }
        );
    }
}
