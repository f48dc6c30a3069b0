//! Episodic memory on a real redis-server started on 127.0.0.1: the contract, and an outage.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::RedisServer;
use soma_adapters::{Entry, EpisodicMemory, Error, RedisEpisodic, Scope, episodic_contract};

#[tokio::test]
async fn redis_episodic_passes_the_contract() {
    let server = RedisServer::start();
    let url = server.url();
    let n = AtomicU32::new(0);
    episodic_contract::run(|| {
        // A fresh namespace per case on the one server.
        let namespace = format!("case{}", n.fetch_add(1, Ordering::SeqCst));
        let url = url.clone();
        async move {
            Arc::new(RedisEpisodic::connect(&url, &namespace).await.unwrap())
                as Arc<dyn EpisodicMemory>
        }
    })
    .await;
}

fn entry(at_ms: u64) -> Entry {
    Entry {
        at_ms,
        role: "user".into(),
        content: format!("m{at_ms}"),
        metadata: serde_json::Value::Null,
    }
}

#[tokio::test]
async fn redis_outage_gives_clear_errors_and_loses_nothing_acknowledged() {
    let mut server = RedisServer::start();
    let m = RedisEpisodic::connect(&server.url(), "outage")
        .await
        .unwrap();
    let scope = Scope::new("acme", "42").unwrap();
    for at in 1..=50 {
        m.append(&scope, entry(at)).await.unwrap();
    }
    server.kill();
    match m.append(&scope, entry(51)).await {
        Err(Error::Server {
            server: "redis",
            address,
            ..
        }) => {
            assert!(address.contains(&server.port.to_string()), "{address}")
        }
        other => panic!("expected a redis error while it is down, got {other:?}"),
    }
    server.restart();
    // The connection manager reconnects; a bounded number of calls may still fail.
    let mut history = None;
    for _ in 0..50 {
        match m.last(&scope, 1000).await {
            Ok(h) => {
                history = Some(h);
                break;
            }
            Err(Error::Server { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let history = history.expect("redis came back but the client did not reconnect");
    let times: Vec<u64> = history.iter().map(|s| s.entry.at_ms).collect();
    assert_eq!(
        times,
        (1..=50).collect::<Vec<_>>(),
        "every acknowledged entry survived"
    );
    m.append(&scope, entry(52)).await.unwrap();
    assert_eq!(m.last(&scope, 1).await.unwrap()[0].entry.at_ms, 52);
}

#[tokio::test]
async fn a_bad_redis_url_names_no_secret() {
    let e = RedisEpisodic::connect("not a url with password hunter2", "ns")
        .await
        .unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(
        matches!(
            e,
            Error::Invalid {
                what: "redis url",
                ..
            }
        ),
        "{e}"
    );
}
