//! `soma cluster status` against a real redis-server holding two members, one of which
//! crashed; `soma cluster drain` says it is not implemented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../adapters/tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use common::RedisServer;
use serde_json::Value;
use soma_cluster::membership::Options;
use soma_cluster::{Membership, NodeName, NodeState, Shards};
use soma_supervision::KeyRange;

fn soma(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_soma"))
        .args(args)
        .env_remove("SOMA_REDIS_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn options(redis: &RedisServer, node: &str) -> Options {
    let mut o = Options::new(redis.url(), "ops", NodeName::new(node).unwrap());
    o.addr = format!("127.0.0.1:{}", 9000 + node.len());
    o.lease = Duration::from_secs(30);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_members_leases_and_shards_per_live_node() {
    let redis = RedisServer::start();
    let a = Membership::join(options(&redis, "alpha")).await.unwrap();
    a.set_state(NodeState::Up).await.unwrap();
    let shards = Shards::new(a.clone());
    for s in 0..5 {
        shards.acquire(KeyRange(s)).await.unwrap();
    }
    // A node that took shards and left without releasing them: its shards count as unowned.
    let b = Membership::join(options(&redis, "bravo")).await.unwrap();
    Shards::new(b.clone()).acquire(KeyRange(7)).await.unwrap();
    b.leave().await.unwrap();

    let url = redis.url();
    let status = [
        "cluster",
        "status",
        "--redis",
        &url,
        "--cluster",
        "ops",
        "--shards",
        "16",
    ];
    let (code, out, err) = soma(&[&status[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shards"], 16);
    assert_eq!(v["unowned"], 11, "{v}");
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    let (alpha, bravo) = (&members[0], &members[1]);
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["state"], "up");
    assert_eq!(alpha["shards"], 5);
    assert_eq!(alpha["addr"], "127.0.0.1:9005");
    assert!(alpha["lease_left_ms"].as_u64().unwrap() > 0);
    assert_eq!(bravo["state"], "down");
    assert_eq!(bravo["shards"], 0);
    assert!(bravo["lease_left_ms"].is_null());

    let (code, table, _) = soma(&status);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("cluster ops: 2 member(s), 16 shard(s), 11 unowned"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains(" up ")),
        "{table}"
    );

    let (code, _, err) = soma(&["cluster", "drain", "alpha"]);
    assert_ne!(code, 0);
    assert!(err.contains("not implemented"), "{err}");
    a.leave().await.unwrap();
}

#[test]
fn status_against_no_server_fails_naming_redis() {
    let (code, _, err) = soma(&["cluster", "status", "--redis", "redis://127.0.0.1:1/"]);
    assert_ne!(code, 0);
    assert!(err.contains("redis"), "{err}");
}
