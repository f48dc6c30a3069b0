//! The vector-memory contract on a Qdrant server. No Qdrant server can be installed on the
//! machines this project is built on (not in Debian, no Docker engine), so the test is
//! `#[ignore]`d: without a server it reports as ignored, not passed. Run it against a server
//! with `QDRANT_URL` (gRPC, e.g. `http://127.0.0.1:6334`) set, and `QDRANT_API_KEY` if the
//! server wants one:
//! `cargo test -p soma-adapters --features qdrant --test vector_qdrant -- --ignored`.
//! Run with `--ignored` and no `QDRANT_URL`, it fails.
#![cfg(feature = "qdrant")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use soma_adapters::{QdrantConfig, QdrantVectors, VectorMemory, vector_contract};

#[tokio::test]
#[ignore = "needs a Qdrant server: set QDRANT_URL and run with --ignored"]
async fn qdrant_server_passes_the_contract() {
    let url = std::env::var("QDRANT_URL").unwrap_or_else(|_| {
        panic!(
            "QDRANT_URL is not set: this test needs a Qdrant server (gRPC, e.g. \
             QDRANT_URL=http://127.0.0.1:6334, with QDRANT_API_KEY if it wants one)"
        )
    });
    let api_key = std::env::var("QDRANT_API_KEY").ok();
    let run = std::process::id();
    let n = AtomicU32::new(0);
    vector_contract::run(|| {
        let config = QdrantConfig {
            url: url.clone(),
            api_key: api_key.clone(),
            collection: format!("soma-contract-{run}-{}", n.fetch_add(1, Ordering::SeqCst)),
            dimension: vector_contract::DIM,
        };
        async move { Arc::new(QdrantVectors::connect(config).await.unwrap()) as Arc<dyn VectorMemory> }
    })
    .await;
}
