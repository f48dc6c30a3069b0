//! Embeddings from the real all-MiniLM-L6-v2 against an independent reference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::Value;
use soma_inference::{EmbedderConfig, EmbedderPool, EmbeddingModel, Engine, Error};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn fixture() -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let text = include_str!("fixtures/minilm_reference.json");
    let v: Value = serde_json::from_str(text).expect("fixture parses");
    v["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .map(|s| {
            (
                s["text"].as_str().expect("text").to_string(),
                s["token_ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|x| x.as_u64().expect("id") as u32)
                    .collect(),
                s["embedding"]
                    .as_array()
                    .expect("embedding")
                    .iter()
                    .map(|x| x.as_f64().expect("f") as f32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn embeddings_match_the_reference_to_1e_4() {
    let model = common::embedder();
    let cases = fixture();
    let texts: Vec<String> = cases.iter().map(|c| c.0.clone()).collect();
    // One batch of different lengths: padding to the longest must not change any vector.
    let batch = model.embed(&texts).expect("embed");
    let mut worst = 0f32;
    for ((text, ids, want), got) in cases.iter().zip(&batch) {
        assert_eq!(
            &model.token_ids(text).expect("tokens"),
            ids,
            "tokens of {text:?}"
        );
        assert_eq!(got.len(), 384);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length, got {norm}");
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs());
        }
        // Alone, unpadded: the same vector.
        let single = model.embed(std::slice::from_ref(text)).expect("embed one");
        for (a, b) in single[0].iter().zip(got) {
            assert!(
                (a - b).abs() < 1e-5,
                "batching changed the vector of {text:?}"
            );
        }
    }
    println!("largest difference from the reference: {worst:e}");
    assert!(worst < 1e-4, "largest difference {worst}");
}

/// Both engines compute the reference's vectors: the native one (the CPU default) and
/// candle's `BertModel`, on the fixture sentences and on a long text near the 256-token cut.
#[test]
fn native_and_candle_engines_give_the_same_vectors() {
    let native = common::embedder();
    assert_eq!(native.engine(), Engine::Native, "the default on the CPU");
    let candle = EmbeddingModel::load_on(
        common::minilm_dir(),
        &candle_core::Device::Cpu,
        Engine::Candle,
    )
    .expect("load on candle");
    assert_eq!(candle.engine(), Engine::Candle);
    let mut texts: Vec<String> = fixture().into_iter().map(|c| c.0).collect();
    texts.push("word ".repeat(300));
    texts.push("x".into());
    let (a, b) = (
        native.embed(&texts).expect("native"),
        candle.embed(&texts).expect("candle"),
    );
    let worst = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    println!("largest difference between the engines: {worst:e}");
    assert!(worst < 1e-5, "engines differ by {worst}");
}

/// The native encoder inside a two-thread pool (matrix products and sequences split across
/// the threads) gives the vectors it gives on one.
#[test]
fn native_engine_gives_the_same_vectors_on_two_threads() {
    let model = common::embedder();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let texts: Vec<String> = fixture().into_iter().map(|c| c.0).collect();
    let a = model.embed(&texts).expect("one thread");
    let b = pool.install(|| model.embed(&texts)).expect("two threads");
    let worst = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "threads changed the vectors by {worst}");
}

#[test]
fn related_sentences_rank_above_unrelated() {
    let model = common::embedder();
    let texts: Vec<String> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "A monkey is playing drums.",
        "How do I reset my password?",
        "I forgot my login credentials and cannot sign in.",
        "The stock market fell sharply today.",
    ]
    .map(String::from)
    .to_vec();
    let v = model.embed(&texts).expect("embed");
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.3);
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[3]));
    assert!(cosine(&v[4], &v[5]) > cosine(&v[4], &v[6]) + 0.2);
    assert!(cosine(&v[4], &v[5]) > cosine(&v[4], &v[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_each_gets_its_own_vector() {
    let model = common::embedder();
    let texts: Vec<String> = (0..48)
        .map(|i| format!("sentence number {i} is about topic {}", i % 7))
        .collect();
    let expected = model.embed(&texts).expect("embed directly");
    let pool = EmbedderPool::start(
        model,
        EmbedderConfig {
            replicas: 2,
            max_batch: 16,
            max_wait: std::time::Duration::from_millis(20),
            ..EmbedderConfig::default()
        },
    )
    .await
    .expect("pool");
    let pool = std::sync::Arc::new(pool);
    let mut tasks = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let pool = pool.clone();
        let text = text.clone();
        tasks.push(tokio::spawn(async move { (i, pool.embed(text).await) }));
    }
    for t in tasks {
        let (i, got) = t.await.expect("task");
        let got = got.expect("embedding");
        let sim = cosine(&got, &expected[i]);
        assert!(
            sim > 0.99999,
            "caller {i} got another vector (cosine {sim})"
        );
    }
    assert_eq!(pool.stats().in_flight, vec![0, 0]);
    assert!(matches!(
        pool.embed_many(Vec::new()).await,
        Err(Error::InvalidRequest(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_its_batch_and_comes_back() {
    let pool = EmbedderPool::start(common::embedder(), EmbedderConfig::default())
        .await
        .expect("pool");
    let long: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{i} {}",
                "a fairly long sentence about many things ".repeat(8)
            )
        })
        .collect();
    let pool = std::sync::Arc::new(pool);
    let p = pool.clone();
    let inflight = tokio::spawn(async move { p.embed_many(long).await });
    // Wait until the batch is on the replica, then kill it.
    while pool.stats().in_flight[0] == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    pool.kill_replica(0).expect("kill");
    let result = inflight.await.expect("task");
    assert!(
        matches!(result, Err(Error::ReplicaFailed { .. })),
        "in-flight request must get an error, got {result:?}"
    );
    pool.wait_ready(std::time::Duration::from_secs(10))
        .await
        .expect("restarted");
    assert_eq!(pool.stats().starts, 2);
    let v = pool.embed("after the restart").await.expect("served again");
    assert_eq!(v.len(), 384);
}
