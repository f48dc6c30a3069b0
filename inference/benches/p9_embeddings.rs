//! P9: MiniLM embeddings, batch 32, CPU, against sentence-transformers (PyTorch) on the same
//! texts and thread count; vectors compared too.
//!
//! `CANDLE_NUM_THREADS=2 RAYON_NUM_THREADS=2 cargo bench -p soma-inference --bench p9_embeddings`
//! (peer: `bash benches/peers/install.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_inference::{EmbedderConfig, EmbedderPool, EmbeddingModel, Engine};

const BATCH: usize = 32;

fn texts(n: usize) -> Vec<String> {
    let subjects = [
        "The cat",
        "A developer",
        "Our team",
        "The market",
        "My neighbour",
        "This model",
    ];
    let verbs = [
        "quietly watches",
        "rewrote",
        "will review",
        "celebrated",
        "cannot explain",
        "measured",
    ];
    let objects = [
        "the sunset over the harbour",
        "a distributed actor runtime with persistent mailboxes",
        "the quarterly report",
        "an old bicycle with a squeaky chain and flat tyres",
        "the results of yesterday's benchmark on two cores",
        "dinner",
    ];
    (0..n)
        .map(|i| {
            let extra = if i % 3 == 0 {
                " and then went home early because it was raining"
            } else {
                ""
            };
            format!(
                "{} {} {}{extra} (note {i}).",
                subjects[i % 6],
                verbs[(i / 6) % 6],
                objects[(i / 36) % 6]
            )
        })
        .collect()
}

fn main() {
    let threads = soma_inference::cpu_threads();
    let n = 512;
    let texts = texts(n);
    let dir = common::models().join("all-MiniLM-L6-v2");
    let model = EmbeddingModel::load(&dir, &candle_core::Device::Cpu).expect("load MiniLM");
    // Run as a pool replica does: inside a rayon pool of the same thread count, so candle's
    // element-wise kernels do not hand every operation to another thread.
    let compute = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    model.embed(&texts[..BATCH]).expect("warm-up");
    let mut unsorted = Duration::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        compute.install(|| {
            for c in texts.chunks(BATCH) {
                model.embed(c).expect("embed");
            }
        });
        unsorted = unsorted.min(t.elapsed());
    }
    let round = |model: &EmbeddingModel, runs: usize| {
        let mut best = Duration::MAX;
        let mut out = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            out = compute
                .install(|| model.embed_all(&texts, BATCH))
                .expect("embed");
            best = best.min(t.elapsed());
        }
        (n as f64 / best.as_secs_f64(), out)
    };
    let (first_rate, ours) = round(&model, 3);
    println!("P9 embeddings: {n} texts, batch {BATCH}, {threads} thread(s)");
    println!(
        "  soma-inference (native)      {first_rate:>8.1} sentences/s (embed_all: sorted by length, batches of {BATCH})"
    );
    let candle = EmbeddingModel::load_on(&dir, &candle_core::Device::Cpu, Engine::Candle)
        .expect("load on candle");
    let (candle_rate, _) = round(&candle, 2);
    println!("  same on candle's BertModel   {candle_rate:>8.1} sentences/s");
    println!(
        "  same, batches in given order {:>8.1} sentences/s",
        n as f64 / unsorted.as_secs_f64()
    );

    // Through the pool: every text its own request, batched dynamically.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool_rate = rt.block_on(async {
        let pool = Arc::new(
            EmbedderPool::start(
                model,
                EmbedderConfig {
                    max_batch: BATCH,
                    ..EmbedderConfig::default()
                },
            )
            .await
            .unwrap(),
        );
        let t = Instant::now();
        let tasks: Vec<_> = texts
            .iter()
            .cloned()
            .map(|s| {
                let p = pool.clone();
                tokio::spawn(async move { p.embed(s).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        n as f64 / t.elapsed().as_secs_f64()
    });
    println!("  EmbedderPool, 1 text/request {pool_rate:>8.1} sentences/s");
    let model = EmbeddingModel::load(&dir, &candle_core::Device::Cpu).expect("load MiniLM");

    let dir_t = tempfile::tempdir().unwrap();
    let texts_file = dir_t.path().join("texts.json");
    let out_file = dir_t.path().join("vectors.json");
    std::fs::write(&texts_file, serde_json::to_vec(&texts).unwrap()).unwrap();
    let peer = common::run_peer(
        "p9_sentence_transformers.py",
        &[
            dir.display().to_string(),
            texts_file.display().to_string(),
            threads.to_string(),
            BATCH.to_string(),
            out_file.display().to_string(),
        ],
    );
    match peer {
        Ok(p) => {
            let theirs: Vec<Vec<f32>> =
                serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
            let worst = ours
                .iter()
                .zip(&theirs)
                .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                .fold(0f32, f32::max);
            let peer_rate = p["per_s"].as_f64().unwrap();
            println!(
                "  {:<28} {peer_rate:>8.1} sentences/s",
                p["peer"].as_str().unwrap_or("peer")
            );
            // Ours again after the peer, so that the peer's run is bracketed by ours.
            let (second_rate, _) = round(&model, 3);
            println!("  soma-inference (native), again {second_rate:>6.1} sentences/s");
            let our_rate = first_rate.max(second_rate);
            println!("  largest vector difference: {worst:.2e} (target 1e-4)");
            println!(
                "ratio (soma-inference native / sentence-transformers): {:.2}x (target >= 1.0x)",
                our_rate / peer_rate
            );
        }
        Err(why) => println!("peer not run: {why}\nratio: unavailable"),
    }
}
