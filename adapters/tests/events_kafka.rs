//! Event streams on a real Kafka-protocol broker (tansu) started on 127.0.0.1: the contract,
//! the outbox across a broker outage, and clear errors while it is down.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::KafkaBroker;
use soma_adapters::{
    Dedup, Error, EventStream, KafkaConfig, KafkaStream, Outbox, OutboxOptions, SledLog, Topic,
    events_contract,
};

fn config(broker: &KafkaBroker, prefix: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(broker.bootstrap());
    c.topic_prefix = prefix.into();
    c.delivery_timeout = Duration::from_secs(5);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_passes_the_contract() {
    let broker = KafkaBroker::start();
    let n = AtomicU32::new(0);
    events_contract::run(|| {
        // A fresh topic prefix (and so fresh topics and groups) per case on the one broker.
        let prefix = format!("case{}.", n.fetch_add(1, Ordering::SeqCst));
        let stream = KafkaStream::new(config(&broker, &prefix)).unwrap();
        async move { Arc::new(stream) as Arc<dyn EventStream> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_dead_broker_fails_naming_it() {
    let mut broker = KafkaBroker::start();
    let mut c = config(&broker, "dead.");
    c.delivery_timeout = Duration::from_secs(2);
    let stream = KafkaStream::new(c).unwrap();
    let e = events_contract::audit("d-1", "acme", 1);
    stream.publish(Topic::AgentAudit, "k", &e).await.unwrap();
    broker.kill();
    let started = std::time::Instant::now();
    match stream.publish(Topic::AgentAudit, "k", &e).await {
        Err(Error::Server {
            server: "kafka",
            address,
            ..
        }) => assert!(address.contains(&broker.port.to_string()), "{address}"),
        other => panic!("expected a kafka error while it is down, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Events published through the outbox while the broker is SIGKILLed and restarted: every
/// acknowledged event reaches the broker, in order per key; duplicates only by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_forwards_everything_acknowledged_across_a_broker_outage() {
    let mut broker = KafkaBroker::start();
    let dir = tempfile::tempdir().unwrap();
    // The stream behind an outbox never gives up a delivery: order per key holds across
    // the outage.
    let mut c = config(&broker, "outage.");
    c.delivery_timeout = Duration::ZERO;
    let server = Arc::new(KafkaStream::new(c).unwrap());
    let options = OutboxOptions {
        batch: 50,
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(500),
        ..OutboxOptions::default()
    };
    let outbox =
        Outbox::start(SledLog::open(dir.path()).unwrap(), server.clone(), options).unwrap();

    let mut acked = Vec::new();
    for n in 0..600u64 {
        if n == 200 {
            broker.kill();
        }
        if n == 400 {
            // Still down: these wait in the embedded log.
            assert!(outbox.pending(Topic::AgentAudit) > 0);
            broker.restart();
        }
        let id = format!("o-{n}");
        let e = events_contract::audit(&id, "acme", n);
        // Publishing never waits for the broker.
        outbox
            .publish(Topic::AgentAudit, &format!("k{}", n % 7), &e)
            .await
            .unwrap();
        acked.push(id);
    }
    assert!(
        outbox.drained(Duration::from_secs(60)).await,
        "still pending: {}",
        outbox.pending(Topic::AgentAudit)
    );
    let records = events_contract::read_all(&*server, Topic::AgentAudit, acked.len()).await;
    let mut dedup = Dedup::new(10_000);
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in &records {
        per_partition.entry(r.partition).or_default().push(r.offset);
        if dedup.first_time(&r.envelope) {
            seen.insert(r.envelope.id.clone());
            let n = events_contract::number(r);
            per_key.entry(r.key.clone()).or_default().push(n);
        }
    }
    let lost: Vec<_> = acked.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    for (key, ns) in per_key {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {ns:?}"
        );
    }
    println!(
        "outbox: {} acknowledged, {} records on the broker ({} duplicates), 0 lost",
        acked.len(),
        records.len(),
        records.len() - seen.len()
    );
}
