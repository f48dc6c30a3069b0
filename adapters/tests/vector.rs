//! The embedded vector memory (qdrant-edge): the contract, restarts, SIGKILL mid-upsert.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

use serde_json::json;
use soma_adapters::{EdgeVectors, Error, Point, VectorMemory, vector_contract};

#[tokio::test]
async fn edge_vectors_pass_the_contract() {
    let root = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    vector_contract::run(|| {
        let dir = root.path().join(
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .to_string(),
        );
        async move {
            Arc::new(EdgeVectors::open(dir, vector_contract::DIM).await.unwrap())
                as Arc<dyn VectorMemory>
        }
    })
    .await;
}

fn point(i: usize) -> Point {
    let serde_json::Value::Object(payload) = json!({"i": i}) else {
        unreachable!()
    };
    Point {
        id: format!("p{i}"),
        vector: vector_contract::axis(i, 0.5),
        payload,
    }
}

#[tokio::test]
async fn points_survive_a_restart_and_indexes_build() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = EdgeVectors::open(dir.path(), vector_contract::DIM)
            .await
            .unwrap();
        m.upsert("acme", (0..50).map(point).collect())
            .await
            .unwrap();
        m.optimize().await.unwrap();
        m.upsert("acme", (50..60).map(point).collect())
            .await
            .unwrap();
        assert_eq!(m.delete("acme", &["p3".into()]).await.unwrap(), 1);
    }
    let m = EdgeVectors::open(dir.path(), vector_contract::DIM)
        .await
        .unwrap();
    assert_eq!(m.count("acme", None).await.unwrap(), 59);
    let hits = m
        .search("acme", &vector_contract::axis(1, 0.5), 1, None)
        .await
        .unwrap();
    assert_eq!(hits[0].payload["i"].as_u64().unwrap() % 8, 1);
    // Open twice at once: refused, saying so.
    let err = EdgeVectors::open(dir.path(), vector_contract::DIM)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("open elsewhere"), "{err}");
    drop(m);
    // Another dimension on the same store is refused, naming both.
    let err = EdgeVectors::open(dir.path(), 16).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "dimension",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Some(8)"), "{err}");
}

/// The child side of the SIGKILL test: upserts numbered points in small batches and prints
/// each batch's ids once acknowledged. Run only by that test (`--ignored --exact`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkill_mid_upsert_loses_no_acknowledged_point; run by that test"]
async fn child_upserter() {
    let dir = common::child_dir("sigkill_mid_upsert_loses_no_acknowledged_point");
    let round: usize = common::child_round();
    let m = EdgeVectors::open(dir, vector_contract::DIM).await.unwrap();
    let mut out = std::io::stdout().lock();
    for batch in 0.. {
        let points: Vec<Point> = (0..5)
            .map(|j| {
                let mut p = point(batch * 5 + j);
                p.id = format!("r{round}-{}", batch * 5 + j);
                p
            })
            .collect();
        let ids: Vec<String> = points.iter().map(|p| p.id.clone()).collect();
        m.upsert("acme", points).await.unwrap();
        for id in ids {
            writeln!(out, "{id}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_mid_upsert_loses_no_acknowledged_point() {
    let dir = tempfile::tempdir().unwrap();
    let acked = common::sigkill_rounds("child_upserter", dir.path(), 4, 700, 600);
    assert!(
        acked.len() >= 20,
        "the child upserted too little: {}",
        acked.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stored, count) = rt.block_on(async {
        let m = EdgeVectors::open(dir.path(), vector_contract::DIM)
            .await
            .unwrap();
        let got = m.get("acme", &acked).await.unwrap();
        let count = m.count("acme", None).await.unwrap();
        (got, count)
    });
    let have: HashSet<&str> = stored.iter().map(|p| p.id.as_str()).collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| !have.contains(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(count >= acked.len() as u64);
    println!(
        "4 SIGKILLs: {} points acknowledged, {count} stored, 0 lost",
        acked.len()
    );
}
