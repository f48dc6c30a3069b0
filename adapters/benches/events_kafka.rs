//! P12: audit events per second to a local Kafka-protocol broker (tansu on 127.0.0.1).
//!
//! Three runs side by side, on the same broker, same event bytes:
//! - baseline: a raw rdkafka `FutureProducer` (same settings) sending the encoded envelopes;
//! - ours: `KafkaStream::publish_batch` (validation, envelope encoding, delivery reports);
//! - outbox: `Outbox` publishing to the embedded log, then forwarding to the broker.
//!
//! `cargo bench -p soma-adapters --features kafka --bench events_kafka`
//! (`SOMA_TANSU` may point at a release build of tansu; the default is the debug build that
//! `scripts/setup.sh` makes.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use soma_adapters::{
    Envelope, EventStream, KafkaConfig, KafkaStream, Outbox, OutboxOptions, SledLog, Topic,
    events_contract,
};

const EVENTS: u64 = 100_000;
const BATCH: usize = 1_000;
const TASKS: usize = 4;
const ROUNDS: usize = 3;
const CLAIM: f64 = 3_400.0;

fn events(round: usize, tag: &str) -> Vec<(String, Envelope)> {
    (0..EVENTS)
        .map(|n| {
            let id = format!("{tag}-{round}-{n}");
            (
                format!("agent-{}", n % 64),
                events_contract::audit(&id, "acme", n),
            )
        })
        .collect()
}

/// The same events, encoded up front, sent by 4 tasks in chunks of 1,000 (as `ours` does),
/// each chunk awaited before its task sends the next.
async fn raw(bootstrap: &str, topic: &str, events: &[(String, Envelope)]) -> f64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let payloads: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|(k, e)| (k.clone(), serde_json::to_vec(e).unwrap()))
        .collect();
    let chunks: Vec<Vec<(String, Vec<u8>)>> = payloads.chunks(BATCH).map(<[_]>::to_vec).collect();
    let chunks = Arc::new(std::sync::Mutex::new(chunks.into_iter()));
    let topic = topic.to_owned();
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (producer, chunks, topic) = (producer.clone(), chunks.clone(), topic.clone());
            tokio::spawn(async move {
                loop {
                    let next = chunks.lock().unwrap().next();
                    let Some(chunk) = next else { break };
                    let mut pending = Vec::with_capacity(chunk.len());
                    for (k, p) in &chunk {
                        let record = FutureRecord::to(&topic)
                            .key(k.as_str())
                            .payload(p.as_slice());
                        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
                    }
                    for d in pending {
                        d.await.unwrap().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    EVENTS as f64 / started.elapsed().as_secs_f64()
}

async fn ours(stream: Arc<KafkaStream>, events: Vec<(String, Envelope)>) -> f64 {
    let chunks: Vec<Vec<_>> = events.chunks(BATCH).map(<[_]>::to_vec).collect();
    let chunks = Arc::new(std::sync::Mutex::new(chunks.into_iter()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (stream, chunks) = (stream.clone(), chunks.clone());
            tokio::spawn(async move {
                loop {
                    let next = chunks.lock().unwrap().next();
                    let Some(chunk) = next else { break };
                    stream
                        .publish_batch(Topic::AgentAudit, &chunk)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    EVENTS as f64 / started.elapsed().as_secs_f64()
}

/// (acknowledged/s into the embedded log, forwarded/s end to end).
async fn outbox(stream: Arc<KafkaStream>, events: Vec<(String, Envelope)>) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(
        Outbox::start(
            SledLog::open(dir.path()).unwrap(),
            stream,
            OutboxOptions {
                batch: 5_000,
                ..OutboxOptions::default()
            },
        )
        .unwrap(),
    );
    let chunks: Vec<Vec<_>> = events.chunks(BATCH).map(<[_]>::to_vec).collect();
    let started = Instant::now();
    for chunk in chunks {
        outbox
            .publish_batch(Topic::AgentAudit, &chunk)
            .await
            .unwrap();
    }
    let acked = started.elapsed();
    assert!(outbox.drained(Duration::from_secs(600)).await);
    let forwarded = started.elapsed();
    (
        EVENTS as f64 / acked.as_secs_f64(),
        EVENTS as f64 / forwarded.as_secs_f64(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let broker = common::KafkaBroker::start();
    let mut config = KafkaConfig::new(broker.bootstrap());
    config.partitions = 3;
    let stream = Arc::new(KafkaStream::new(config).unwrap());
    stream.ensure_topics().await.unwrap();
    let (mut r, mut o, mut oa, mut of) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let raw_rate = raw(&broker.bootstrap(), "agent.audit", &events(round, "raw")).await;
        let ours_rate = ours(stream.clone(), events(round, "ours")).await;
        let (acked, forwarded) = outbox(stream.clone(), events(round, "outbox")).await;
        println!(
            "round {round}: raw rdkafka {raw_rate:.0}/s, KafkaStream {ours_rate:.0}/s, \
             outbox acked {acked:.0}/s forwarded {forwarded:.0}/s"
        );
        r.push(raw_rate);
        o.push(ours_rate);
        oa.push(acked);
        of.push(forwarded);
    }
    let (r, o, oa, of) = (median(r), median(o), median(oa), median(of));
    println!(
        "P12 ({EVENTS} audit events x {ROUNDS} rounds, median): KafkaStream {o:.0}/s, \
         raw rdkafka {r:.0}/s, outbox end to end {of:.0}/s (acked {oa:.0}/s)"
    );
    println!(
        "P12 ratio: KafkaStream / raw rdkafka = {:.2}x; KafkaStream / claimed 3,400/s = {:.1}x; \
         outbox / claimed = {:.1}x (target >= 100,000/s: {})",
        o / r,
        o / CLAIM,
        of / CLAIM,
        if o >= 100_000.0 { "met" } else { "missed" }
    );
}
