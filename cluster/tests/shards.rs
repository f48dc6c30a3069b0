//! Shard ownership on a real redis-server: epochs bumped by compare-and-set, hand-off by
//! release, failover once the holder's lease expired and not before.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../adapters/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::RedisServer;
use soma_cluster::membership::Options;
use soma_cluster::{Error, Membership, NodeName, NodeState, Serving, Shards, Taken};
use soma_supervision::KeyRange;
use tokio::time::{Instant, timeout};

const LEASE: Duration = Duration::from_millis(1500);
const RENEW: Duration = Duration::from_millis(300);

fn options(redis: &RedisServer, node: &str) -> Options {
    let mut o = Options::new(redis.url(), "test", NodeName::new(node).unwrap());
    o.lease = LEASE;
    o.renew = RENEW;
    o.clock_bound = Duration::from_millis(200);
    o
}

async fn node(redis: &RedisServer, name: &str) -> (Membership, Shards) {
    let m = Membership::join(options(redis, name)).await.unwrap();
    let s = Shards::new(m.clone());
    (m, s)
}

#[tokio::test]
async fn a_shard_moves_by_release_and_its_epoch_only_grows() {
    let redis = RedisServer::start();
    let (_a, a) = node(&redis, "a").await;
    let (_b, b) = node(&redis, "b").await;
    let s = KeyRange(5);

    let (e1, how) = a.acquire(s).await.unwrap();
    assert_eq!((e1, how), (1, Taken::Free));
    assert_eq!(
        a.acquire(s).await.unwrap(),
        (1, Taken::Held),
        "taking it again changes nothing"
    );
    match b.acquire(s).await {
        Err(Error::ShardHeld { holder, shard, .. }) => {
            assert_eq!(holder.as_str(), "a");
            assert_eq!(shard, s);
        }
        other => panic!("b took a shard a holds: {other:?}"),
    }

    // A release at a wrong epoch is refused; at the held epoch it hands the shard off.
    assert!(matches!(
        a.release(s, e1 + 1).await,
        Err(Error::NotHolder { .. })
    ));
    a.release(s, e1).await.unwrap();
    assert!(
        matches!(a.release(s, e1).await, Err(Error::NotHolder { .. })),
        "released twice"
    );
    let (e2, how) = b.acquire(s).await.unwrap();
    assert_eq!(how, Taken::Released);
    assert!(e2 > e1);
    let holder = a.holder(s).await.unwrap();
    assert_eq!(holder.epoch, e2);
    assert_eq!(holder.node.unwrap().0.as_str(), "b");
    // Other shards are untouched.
    assert_eq!(a.holder(KeyRange(6)).await.unwrap().epoch, 0);
}

#[tokio::test]
async fn a_crashed_holders_shard_is_taken_once_its_lease_expired_and_not_before() {
    let redis = RedisServer::start();
    let s = KeyRange(9);
    // The holder runs on a runtime of its own, dropped without a leave: a crash.
    let url = redis.url();
    let held = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut o = Options::new(url, "test", NodeName::new("crash").unwrap());
            o.lease = LEASE;
            o.renew = RENEW;
            o.clock_bound = Duration::from_millis(200);
            let m = Membership::join(o).await.unwrap();
            Shards::new(m).acquire(s).await.unwrap().0
        })
    })
    .join()
    .unwrap();
    let crashed = Instant::now();
    let (b_member, b) = node(&redis, "b").await;
    match b.acquire(s).await {
        Err(Error::ShardHeld { holder, .. }) => assert_eq!(holder.as_str(), "crash"),
        other => panic!("taken while the holder's lease was alive: {other:?}"),
    }
    // Failover waits for the membership to see the holder's lease gone.
    let mut seen = b_member.members();
    timeout(
        LEASE * 3,
        seen.wait_for(|m| {
            m.iter()
                .any(|m| m.name.as_str() == "crash" && m.state == NodeState::Down)
        }),
    )
    .await
    .expect("the crashed holder was never marked down")
    .unwrap();
    let taken = b.acquire(s).await.unwrap();
    let took = crashed.elapsed();
    println!("shard taken over {} ms after the crash", took.as_millis());
    assert!(
        took >= LEASE - RENEW,
        "taken after {took:?}, before the lease expired"
    );
    assert_eq!(taken, (held + 1, Taken::Expired));
}

#[tokio::test]
async fn a_restarted_node_takes_back_its_earlier_incarnations_shards_with_a_new_epoch() {
    let redis = RedisServer::start();
    let s = KeyRange(3);
    let (first, shards) = node(&redis, "c").await;
    let (e1, _) = shards.acquire(s).await.unwrap();
    first.leave().await.unwrap();
    // The old incarnation left without releasing: the shard is its until the new one takes
    // it, with a higher epoch, so late writes of the old one are fenced.
    let (_again, shards) = node(&redis, "c").await;
    let (e2, how) = shards.acquire(s).await.unwrap();
    assert_eq!(how, Taken::Expired);
    assert!(e2 > e1);
}

#[tokio::test]
async fn a_node_without_its_lease_takes_nothing() {
    let redis = RedisServer::start();
    let (m, shards) = node(&redis, "d").await;
    let _: () = redis::cmd("DEL")
        .arg("soma:{test}:lease:d")
        .query_async(
            &mut redis::Client::open(redis.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(matches!(
        shards.acquire(KeyRange(1)).await,
        Err(Error::LeaseLost { .. })
    ));
    let mut serving = m.serving();
    timeout(
        Duration::from_secs(10),
        serving.wait_for(|s| *s == Serving::Lost),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(shards.holder(KeyRange(1)).await.unwrap().epoch, 0);
}
