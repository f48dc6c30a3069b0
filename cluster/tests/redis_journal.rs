//! The journal contract on the Redis backend, against a real redis-server (append-only,
//! fsync always) started on 127.0.0.1. The crash hook SIGKILLs the server and starts it
//! again from its append-only file, and drops the journal without closing it: what the
//! contract then finds is what a crash of both leaves.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../adapters/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use common::RedisServer;
use soma_cluster::{RedisJournal, RedisOptions};
use soma_supervision::{Error, Journal, contract};

struct Harness {
    redis: Mutex<RedisServer>,
    url: String,
    next: AtomicU32,
}

impl Harness {
    fn new() -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        Self {
            redis: Mutex::new(redis),
            url,
            next: AtomicU32::new(0),
        }
    }

    fn options(&self, cluster: &str) -> RedisOptions {
        let mut o = RedisOptions::new(&self.url, cluster, "n1");
        o.ranges = 16;
        o
    }

    async fn fresh(&self) -> Arc<dyn Journal> {
        let cluster = format!("c{}", self.next.fetch_add(1, Ordering::Relaxed));
        Arc::new(RedisJournal::open(self.options(&cluster)).await.unwrap())
    }

    async fn crash(&self, j: Arc<dyn Journal>) -> Arc<dyn Journal> {
        let cluster = format!("{j:?}")
            .split("soma:{")
            .nth(1)
            .and_then(|s| s.split('}').next())
            .unwrap()
            .to_string();
        drop(j);
        self.redis.lock().unwrap().restart();
        Arc::new(RedisJournal::open(self.options(&cluster)).await.unwrap())
    }
}

#[tokio::test]
async fn redis_journal_passes_the_contract() {
    let h = Harness::new();
    contract::run(|| h.fresh(), |j| h.crash(j)).await;
}

#[tokio::test]
async fn a_clean_close_is_not_a_crash_and_refuses_writes() {
    let h = Harness::new();
    let j = RedisJournal::open(h.options("clean")).await.unwrap();
    assert!(!j.recovered_from_crash());
    let held = contract::hold(&j, &["k"]).await;
    j.append(&[contract::app(&j, &held, "k", b"1")])
        .await
        .unwrap();
    j.close().await.unwrap();
    assert!(matches!(
        j.append(&[contract::app(&j, &held, "k", b"2")]).await,
        Err(Error::Stopped { .. })
    ));
    let again = RedisJournal::open(h.options("clean")).await.unwrap();
    assert!(
        !again.recovered_from_crash(),
        "a closed journal reopens clean"
    );
    assert_eq!(again.pending("k", 1, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_server_without_fsync_always_is_refused() {
    let h = Harness::new();
    let mut conn = redis::Client::open(h.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("everysec")
        .query_async(&mut conn)
        .await
        .unwrap();
    match RedisJournal::open(h.options("lax")).await {
        Err(Error::InvalidOption { key, reason }) => {
            assert_eq!(key, "journal.redis.require_fsync");
            assert!(reason.contains("appendfsync"), "{reason}");
        }
        other => panic!("opened on a server that does not fsync: {other:?}"),
    }
    let mut lax = h.options("lax");
    lax.require_fsync = false;
    RedisJournal::open(lax).await.unwrap();
}

/// A server that lost acknowledged writes (its data replaced by an older copy, here: the
/// inbox stream deleted behind the journal's back) reads as corrupt, never as an empty inbox.
#[tokio::test]
async fn lost_messages_read_as_corrupt() {
    let h = Harness::new();
    let j = RedisJournal::open(h.options("lossy")).await.unwrap();
    let held = contract::hold(&j, &["k"]).await;
    let batch: Vec<_> = (0..5u8)
        .map(|i| contract::app(&j, &held, "k", &[i]))
        .collect();
    j.append(&batch).await.unwrap();
    let mut conn = redis::Client::open(h.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("XDEL")
        .arg("soma:{lossy}:i:k")
        .arg("0-3")
        .query_async(&mut conn)
        .await
        .unwrap();
    match j.pending("k", 1, 10).await {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("seq 3"), "{detail}"),
        other => panic!("a gap read as {other:?}"),
    }
    let _: () = redis::cmd("DEL")
        .arg("soma:{lossy}:i:k")
        .query_async(&mut conn)
        .await
        .unwrap();
    match j.pending("k", 1, 10).await {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("missing"), "{detail}"),
        other => panic!("a lost inbox read as {other:?}"),
    }
}

/// In a cluster the journal takes ranges through the shard table: one live holder at a time,
/// and the epochs it fences writes by are the shard epochs.
#[tokio::test]
async fn a_cluster_journal_takes_ranges_through_the_shard_table() {
    use soma_cluster::membership::Options;
    use soma_cluster::{Membership, NodeName, Shards};
    use std::time::Duration;

    let h = Harness::new();
    let node = |name: &str| {
        let mut o = Options::new(&h.url, "shared", NodeName::new(name).unwrap());
        o.lease = Duration::from_millis(1500);
        o.renew = Duration::from_millis(300);
        o.clock_bound = Duration::from_millis(200);
        o
    };
    let (ma, mb) = (
        Membership::join(node("a")).await.unwrap(),
        Membership::join(node("b")).await.unwrap(),
    );
    let open = |name: &'static str, m: &Membership| {
        let shards = Shards::new(m.clone());
        let options = RedisOptions::new(&h.url, "shared", name);
        async move {
            RedisJournal::open_in_cluster(options, shards)
                .await
                .unwrap()
        }
    };
    let (ja, jb) = (open("a", &ma).await, open("b", &mb).await);
    let r = ja.range_of("k");
    let ea = ja.acquire(r).await.unwrap();
    assert!(
        matches!(jb.acquire(r).await, Err(Error::NotOwned { .. })),
        "b cannot take a shard a holds"
    );
    let append = |j: &RedisJournal, epoch, payload: &'static [u8]| {
        let a = soma_supervision::Append {
            key: Arc::from("k"),
            payload: soma_supervision::Bytes::from_static(payload),
            epoch,
        };
        let j = j.clone();
        async move { j.append(&[a]).await }
    };
    assert_eq!(append(&ja, ea, b"a-1").await.unwrap(), vec![1]);
    ja.release(r, ea).await.unwrap();
    assert!(matches!(
        append(&ja, ea, b"a-2").await,
        Err(Error::Fenced { .. })
    ));
    let eb = jb.acquire(r).await.unwrap();
    assert!(eb > ea, "the shard epoch grew: {ea} -> {eb}");
    assert_eq!(append(&jb, eb, b"b-2").await.unwrap(), vec![2]);
    assert!(matches!(
        append(&ja, ea, b"a-3").await,
        Err(Error::Fenced { .. })
    ));
    let payloads: Vec<_> = jb
        .pending("k", 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(payloads, vec![&b"a-1"[..], &b"b-2"[..]]);
    // A holder whose lease is gone (here: dropped by hand, as its expiry would) writes
    // nothing more, at its current epoch too, before anyone took the shard.
    let mut conn = redis::Client::open(h.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg("soma:{shared}:lease:b")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(
            append(&jb, eb, b"b-late").await,
            Err(Error::Fenced {
                reason: soma_supervision::Fence::LeaseExpired { .. },
                ..
            })
        ),
        "a node without its lease appended"
    );
    ma.leave().await.unwrap();
    mb.shutdown().await;
}

#[test]
fn options_never_show_the_password() {
    let url = "redis://user:s3cret@127.0.0.1:6379/";
    let journal = format!("{:?}", RedisOptions::new(url, "c", "n"));
    let node = soma_cluster::NodeName::new("n").unwrap();
    let membership = format!(
        "{:?}",
        soma_cluster::membership::Options::new(url, "c", node)
    );
    for shown in [journal, membership] {
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("127.0.0.1:6379"), "{shown}");
    }
}
