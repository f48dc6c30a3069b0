//! Membership on a real redis-server (append-only, fsync always) started on 127.0.0.1:
//! leases, states, expiry of a crashed node's lease, and a node cut off from Redis that
//! stops serving before its lease can expire.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../adapters/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::RedisServer;
use soma_cluster::membership::Options;
use soma_cluster::{Error, Member, Membership, NodeName, NodeState, Serving};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

const LEASE: Duration = Duration::from_millis(1500);
const RENEW: Duration = Duration::from_millis(300);
const BOUND: Duration = Duration::from_millis(200);

fn options(redis: &RedisServer, node: &str) -> Options {
    let mut o = Options::new(redis.url(), "test", NodeName::new(node).unwrap());
    o.addr = format!("127.0.0.1:{}", 7000 + node.len());
    o.lease = LEASE;
    o.renew = RENEW;
    o.clock_bound = BOUND;
    o
}

async fn until<T>(rx: &mut watch::Receiver<T>, what: &str, f: impl FnMut(&T) -> bool) {
    timeout(Duration::from_secs(20), rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

fn state_of(members: &[Member], node: &str) -> Option<NodeState> {
    members
        .iter()
        .find(|m| m.name.as_str() == node)
        .map(|m| m.state)
}

/// Joins `node` on a runtime of its own thread, marks it up, then drops the runtime: its
/// renewals stop without a leave, as a SIGKILL would leave them. Returns when it is gone.
fn join_and_crash(o: Options) -> u64 {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let incarnation = rt.block_on(async {
            let m = Membership::join(o).await.unwrap();
            m.set_state(NodeState::Up).await.unwrap();
            m.incarnation()
        });
        drop(rt);
        incarnation
    })
    .join()
    .unwrap()
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn nodes_see_each_other_join_go_up_and_leave() {
    let redis = RedisServer::start();
    let a = Membership::join(options(&redis, "a")).await.unwrap();
    let b = Membership::join(options(&redis, "b")).await.unwrap();
    a.set_state(NodeState::Up).await.unwrap();
    b.set_state(NodeState::Up).await.unwrap();
    let mut seen = a.members();
    until(&mut seen, "a and b up, as a reads it", |m| {
        state_of(m, "a") == Some(NodeState::Up) && state_of(m, "b") == Some(NodeState::Up)
    })
    .await;
    let row = seen
        .borrow()
        .iter()
        .find(|m| m.name.as_str() == "b")
        .cloned()
        .unwrap();
    assert_eq!(row.addr, "127.0.0.1:7001");
    assert_eq!(row.incarnation, b.incarnation());

    b.leave().await.unwrap();
    until(&mut seen, "b down after its leave", |m| {
        state_of(m, "b") == Some(NodeState::Down)
    })
    .await;
    let lease: Option<String> = redis::cmd("GET")
        .arg("soma:{test}:lease:b")
        .query_async(&mut raw(&redis).await)
        .await
        .unwrap();
    assert_eq!(lease, None, "a leave drops the lease");
    assert_eq!(*a.serving().borrow(), Serving::Yes);
    a.leave().await.unwrap();
}

#[tokio::test]
async fn a_crashed_node_is_marked_down_once_its_lease_expired_and_not_before() {
    let redis = RedisServer::start();
    let a = Membership::join(options(&redis, "a")).await.unwrap();
    let crashed_at = Instant::now();
    join_and_crash(options(&redis, "crash"));
    let mut seen = a.members();
    until(&mut seen, "the crashed node down", |m| {
        state_of(m, "crash") == Some(NodeState::Down)
    })
    .await;
    let took = crashed_at.elapsed();
    println!("crashed node marked down after {} ms", took.as_millis());
    // Its last renewal happened at most one renewal period before the crash; Redis expires
    // the lease a full lease after it: nobody may see it down sooner.
    assert!(
        took >= LEASE - RENEW,
        "marked down after {took:?}, before its lease expired"
    );
    assert!(took <= LEASE + RENEW * 3, "marked down only after {took:?}");
    a.leave().await.unwrap();
}

#[tokio::test]
async fn a_restarted_node_waits_for_its_earlier_incarnations_lease() {
    let redis = RedisServer::start();
    let first = join_and_crash(options(&redis, "c"));
    let started = Instant::now();
    let again = Membership::join(options(&redis, "c")).await.unwrap();
    let waited = started.elapsed();
    assert!(again.incarnation() > first);
    // The crashed incarnation's lease had at least LEASE - RENEW to run.
    assert!(waited >= LEASE - RENEW * 2, "joined after {waited:?}");
    again.leave().await.unwrap();
}

#[tokio::test]
async fn a_node_cut_off_from_redis_stops_serving_before_its_lease_can_expire() {
    let mut redis = RedisServer::start();
    let a = Membership::join(options(&redis, "a")).await.unwrap();
    let mut serving = a.serving();
    // A renewal or two, so that the last success is a renewal, not the join.
    tokio::time::sleep(RENEW * 2).await;
    let cut = Instant::now();
    redis.kill();
    until(&mut serving, "serving to stop", |s| *s != Serving::Yes).await;
    let took = cut.elapsed();
    println!("stopped serving {} ms after redis died", took.as_millis());
    assert_eq!(*serving.borrow(), Serving::Suspended);
    // The last renewal that succeeded was sent before the cut: the node's deadline is at
    // most `lease - clock_bound` after it, while Redis keeps the lease a full lease.
    assert!(
        took <= LEASE - BOUND,
        "still serving {took:?} after the cut"
    );

    // Back after the lease expired in Redis: the incarnation has lost it for good.
    tokio::time::sleep(LEASE).await;
    redis.restart();
    until(&mut serving, "the lease lost", |s| *s == Serving::Lost).await;
    assert!(matches!(
        a.set_state(NodeState::Up).await,
        Err(Error::LeaseLost { .. })
    ));
    a.shutdown().await;
    let again = Membership::join(options(&redis, "a")).await.unwrap();
    assert!(again.incarnation() > a.incarnation());
    again.leave().await.unwrap();
}

#[tokio::test]
async fn a_short_redis_outage_inside_the_lease_keeps_the_node() {
    let mut redis = RedisServer::start();
    let a = Membership::join(options(&redis, "a")).await.unwrap();
    tokio::time::sleep(RENEW * 2).await;
    redis.restart();
    // The lease survived the restart (append-only, fsync always); the next renewals find it.
    // `Lost` is final, so reaching `Yes` again means it never was.
    let mut serving = a.serving();
    until(&mut serving, "serving again", |s| *s == Serving::Yes).await;
    a.set_state(NodeState::Up).await.unwrap();
    a.leave().await.unwrap();
}

#[tokio::test]
async fn an_incarnation_whose_lease_was_taken_cannot_write() {
    let redis = RedisServer::start();
    let old = Membership::join(options(&redis, "d")).await.unwrap();
    // As if the old incarnation had been paused past its lease: the key expires, a new
    // incarnation under the same name takes it.
    let _: () = redis::cmd("DEL")
        .arg("soma:{test}:lease:d")
        .query_async(&mut raw(&redis).await)
        .await
        .unwrap();
    let new = Membership::join(options(&redis, "d")).await.unwrap();
    assert!(new.incarnation() > old.incarnation());
    let mut serving = old.serving();
    until(
        &mut serving,
        "the old incarnation to see its lease lost",
        |s| *s == Serving::Lost,
    )
    .await;
    match old.set_state(NodeState::Up).await {
        Err(Error::LeaseLost { incarnation, .. }) => assert_eq!(incarnation, old.incarnation()),
        other => panic!("a stale incarnation wrote its state: {other:?}"),
    }
    assert!(old.leave().await.is_err());
    let rows = new.read_members().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].incarnation, new.incarnation());
    assert_eq!(rows[0].state, NodeState::Joining);
    new.leave().await.unwrap();
}

#[tokio::test]
async fn a_lease_too_short_for_its_renewals_is_refused_by_name() {
    let mut o = Options::new("redis://127.0.0.1:1/", "test", NodeName::new("e").unwrap());
    o.lease = Duration::from_millis(1000);
    o.renew = Duration::from_millis(500);
    match Membership::join(o).await {
        Err(Error::Config { key, .. }) => assert_eq!(key, "cluster.lease_ms"),
        other => panic!("{other:?}"),
    }
}
