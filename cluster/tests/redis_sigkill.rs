//! SIGKILL under load on the Redis journal: a child process runs the ledger workload (adds,
//! durable timers, dead letters and re-drives) on a runtime over a real redis-server, and is
//! SIGKILLed at a random moment, eight times; in two of the rounds the redis-server itself is
//! SIGKILLed mid-round and started again from its append-only file. Then this process opens
//! the journal, lets every timer fire and re-drives every dead letter, and counts: every
//! acknowledged message applied exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../adapters/tests/common/mod.rs"]
mod common;
#[path = "../../supervision/tests/common/ledger.rs"]
mod ledger;

use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use ledger::{Ledger, registry_options};
use soma_cluster::{RedisJournal, RedisOptions};
use soma_supervision::{Runtime, RuntimeOptions};

const CHILD_URL: &str = "SOMA_REDIS_SIGKILL_URL";
const CHILD_ROUND: &str = "SOMA_REDIS_SIGKILL_ROUND";

async fn runtime(url: &str) -> Runtime {
    let mut o = RedisOptions::new(url, "sigkill", "node-1");
    o.ranges = 64;
    o.timeout_ms = 1_000;
    let journal = RedisJournal::open(o).await.unwrap();
    // The sled options in RuntimeOptions are unused with another journal.
    Runtime::with_journal(Arc::new(journal), &RuntimeOptions::new("unused"))
        .await
        .unwrap()
}

/// The ledger workload on the Redis journal, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkill_on_the_redis_journal_loses_nothing; run by it"]
async fn child_redis_workload() {
    let url = std::env::var(CHILD_URL).unwrap_or_else(|_| panic!("{CHILD_URL} is not set"));
    let round: u64 = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
    let rt = runtime(&url).await;
    let reg = rt
        .registry(Ledger { applied: None }, registry_options())
        .await
        .unwrap();
    ledger::workload(reg, round).await;
}

#[test]
fn sigkill_on_the_redis_journal_loses_nothing() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let env = [(CHILD_URL, url.clone())];
    let mut server_kills = 0;
    let acked = ledger::run_rounds(
        "child_redis_workload",
        &env,
        CHILD_ROUND,
        8,
        |round, lines| {
            if round % 3 == 0 && lines == 150 {
                redis.kill(); // SIGKILL of the server, mid-round
                std::thread::sleep(Duration::from_millis(300));
                redis.restart();
                server_kills += 1;
            }
        },
    );
    assert_eq!(server_kills, 2, "the server was killed mid-round twice");
    assert!(acked.add.len() > 500, "too little work: {acked:?}");
    assert!(
        acked.later.len() > 100 && acked.strict.len() > 50,
        "{acked:?}"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        ledger::verify(runtime(&url).await, &acked).await;
    });
}
