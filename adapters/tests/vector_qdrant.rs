//! The vector-memory contract on a Qdrant server. No Qdrant server can be installed on the
//! machines this project is built on (not in Debian, no Docker engine): the test runs when
//! `QDRANT_URL` (gRPC, e.g. `http://127.0.0.1:6334`) is set, with `QDRANT_API_KEY` if the
//! server wants one, and otherwise prints why it did not run.
#![cfg(feature = "qdrant")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use soma_adapters::{QdrantConfig, QdrantVectors, VectorMemory, vector_contract};

#[tokio::test]
async fn qdrant_server_passes_the_contract() {
    let Ok(url) = std::env::var("QDRANT_URL") else {
        println!("skipped: QDRANT_URL is not set (no Qdrant server can be installed here)");
        return;
    };
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
