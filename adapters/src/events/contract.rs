//! The contract every [`EventStream`] backend passes. `make` gives a fresh, empty stream
//! (its own directory, or its own topic prefix on a shared broker) per case.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{AuditEvent, Dedup, Envelope, EventStream, Outcome, PolicyDecision, Record, Topic};
use crate::error::Error;

const WAIT: Duration = Duration::from_secs(10);

/// An audit event with id `id`.
pub fn audit(id: &str, tenant: &str, n: u64) -> Envelope {
    let event = AuditEvent {
        actor: format!("agent/{n}"),
        action: "tool.call".into(),
        outcome: Outcome::Succeeded,
        session: Some("s1".into()),
        detail: serde_json::json!({ "n": n }),
    };
    Envelope::new(id, tenant, 1_700_000_000_000 + n, &event).unwrap()
}

/// The number `n` an [`audit`] event was made with.
pub fn number(r: &Record) -> u64 {
    r.envelope.payload["detail"]["n"].as_u64().unwrap()
}

/// Every event of a topic, read partition by partition from offset 0 until `want` are seen
/// (or nothing more comes).
pub async fn read_all(stream: &dyn EventStream, topic: Topic, want: usize) -> Vec<Record> {
    let partitions = stream.partitions(topic).await.unwrap();
    let mut next = vec![0u64; partitions as usize];
    let mut out = Vec::new();
    let mut idle = 0;
    while out.len() < want && idle < 2 {
        let mut got = false;
        for p in 0..partitions {
            let wait = Duration::from_millis(500);
            let batch = stream
                .read(topic, p, next[p as usize], 1000, wait)
                .await
                .unwrap();
            if let Some(last) = batch.last() {
                next[p as usize] = last.offset + 1;
                got = true;
            }
            out.extend(batch);
        }
        idle = if got { 0 } else { idle + 1 };
    }
    out
}

/// Runs every case.
pub async fn run<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn EventStream>>,
{
    round_trip_keeps_per_key_order(make().await).await;
    bad_events_are_refused_with_their_reason(make().await).await;
    a_waiting_read_sees_a_later_event(make().await).await;
    groups_resume_after_their_commit(make().await).await;
    duplicates_are_dropped_by_id(make().await).await;
    typed_events_decode(make().await).await;
}

async fn round_trip_keeps_per_key_order(s: Arc<dyn EventStream>) {
    let mut batch = Vec::new();
    for n in 0..60u64 {
        let key = format!("session-{}", n % 4);
        let e = audit(&format!("rt-{n}"), "acme", n);
        if n < 30 {
            let r = s.publish(Topic::AgentAudit, &key, &e).await.unwrap();
            assert!(!r.duplicate);
        } else {
            batch.push((key, e));
        }
    }
    let receipts = s.publish_batch(Topic::AgentAudit, &batch).await.unwrap();
    assert_eq!(receipts.len(), 30);
    let records = read_all(&*s, Topic::AgentAudit, 60).await;
    assert_eq!(
        records.len(),
        60,
        "every acknowledged event is read back once"
    );
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &records {
        assert_eq!(r.topic, Topic::AgentAudit);
        let n = number(r);
        assert_eq!(r.key, format!("session-{}", n % 4));
        per_key.entry(r.key.clone()).or_default().push(n);
    }
    for (key, ns) in per_key {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {ns:?}"
        );
        assert_eq!(ns.len(), 15);
    }
    // Other topics are untouched.
    assert!(read_all(&*s, Topic::PolicyDecisions, 1).await.is_empty());
}

async fn bad_events_are_refused_with_their_reason(s: Arc<dyn EventStream>) {
    let e = audit("bad-1", "acme", 1);
    let err = s
        .publish(Topic::PolicyDecisions, "k", &e)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "event schema",
                ..
            }
        ),
        "{err}"
    );
    let err = s.publish(Topic::AgentAudit, "", &e).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "event key",
                ..
            }
        ),
        "{err}"
    );
    let mut no_id = e.clone();
    no_id.id.clear();
    let err = s.publish(Topic::AgentAudit, "k", &no_id).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "event id",
                ..
            }
        ),
        "{err}"
    );
    let mut bad_schema = e.clone();
    bad_schema.schema = "agent.audit".into();
    let err = s
        .publish(Topic::AgentAudit, "k", &bad_schema)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("<topic>/v<version>"), "{err}");
    let mut huge = e.clone();
    huge.payload = serde_json::json!({ "detail": "x".repeat(1_000_000) });
    let err = s.publish(Topic::AgentAudit, "k", &huge).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "event payload",
                ..
            }
        ),
        "{err}"
    );
    // A batch with one bad event stores none of it.
    let batch = vec![("k".to_owned(), e.clone()), ("k".to_owned(), no_id)];
    assert!(s.publish_batch(Topic::AgentAudit, &batch).await.is_err());
    assert!(read_all(&*s, Topic::AgentAudit, 1).await.is_empty());
    let n = s.partitions(Topic::AgentAudit).await.unwrap();
    let err = s
        .read(Topic::AgentAudit, n, 0, 10, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "partition",
                ..
            }
        ),
        "{err}"
    );
    let err = s.consumer("", Topic::AgentAudit).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "consumer group",
                ..
            }
        ),
        "{err}"
    );
}

async fn a_waiting_read_sees_a_later_event(s: Arc<dyn EventStream>) {
    // Kafka's partitioner decides where a key goes: find it with a first event.
    s.publish(Topic::SlmRequests, "k", &slm("w-0"))
        .await
        .unwrap();
    let first = read_all(&*s, Topic::SlmRequests, 1).await;
    assert_eq!(first.len(), 1);
    let (p, next) = (first[0].partition, first[0].offset + 1);
    let writer = s.clone();
    let publish = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer
            .publish(Topic::SlmRequests, "k", &slm("w-1"))
            .await
            .unwrap();
    });
    // An unbounded wait is fine (it ends when the event comes).
    let got = s
        .read(Topic::SlmRequests, p, next, 10, Duration::MAX)
        .await
        .unwrap();
    publish.await.unwrap();
    assert_eq!(got.len(), 1, "the read waited for the event");
    assert_eq!(got[0].envelope.id, "w-1");
    // Nothing there: an empty answer after the wait, not an error.
    let none = s
        .read(
            Topic::SlmRequests,
            p,
            next + 1,
            10,
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
}

fn slm(id: &str) -> Envelope {
    let event = super::SlmRequest {
        request_id: id.into(),
        model: "smollm2".into(),
        kind: "generate".into(),
        prompt_tokens: 5,
        completion_tokens: 7,
        latency_ms: 12,
        status: "ok".into(),
    };
    Envelope::new(id, "acme", 1, &event).unwrap()
}

async fn poll_until(c: &mut dyn super::GroupConsumer, want: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while out.len() < want && tokio::time::Instant::now() < deadline {
        out.extend(
            c.poll(want - out.len(), Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    out
}

async fn groups_resume_after_their_commit(s: Arc<dyn EventStream>) {
    let events: Vec<_> = (0..40u64)
        .map(|n| (format!("k{}", n % 5), audit(&format!("g-{n}"), "acme", n)))
        .collect();
    s.publish_batch(Topic::AgentAudit, &events).await.unwrap();

    let mut first = s.consumer("billing", Topic::AgentAudit).await.unwrap();
    let got = poll_until(&mut *first, 40).await;
    assert_eq!(got.len(), 40, "a new group starts at the beginning");
    // Commit per partition only the first half of what it got; drop the consumer.
    let mut by_partition: HashMap<u32, Vec<Record>> = HashMap::new();
    for r in got {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut committed = Vec::new();
    let mut rest = Vec::new();
    for (_, mut rs) in by_partition {
        rs.sort_by_key(|r| r.offset);
        let tail = rs.split_off(rs.len() / 2);
        committed.extend(rs);
        rest.extend(tail);
    }
    first.commit(&committed).await.unwrap();
    drop(first);

    let mut second = s.consumer("billing", Topic::AgentAudit).await.unwrap();
    let again = poll_until(&mut *second, rest.len()).await;
    let mut want: Vec<String> = rest.iter().map(|r| r.envelope.id.clone()).collect();
    let mut have: Vec<String> = again.iter().map(|r| r.envelope.id.clone()).collect();
    want.sort();
    have.sort();
    assert_eq!(
        have, want,
        "the group resumes after its commit, nothing committed again"
    );
    second.commit(&again).await.unwrap();
    let more = second.poll(10, Duration::from_millis(300)).await.unwrap();
    assert!(more.is_empty(), "nothing left: {more:?}");
    drop(second);

    // Another group has its own position.
    let mut other = s.consumer("search-index", Topic::AgentAudit).await.unwrap();
    assert_eq!(poll_until(&mut *other, 40).await.len(), 40);
}

async fn duplicates_are_dropped_by_id(s: Arc<dyn EventStream>) {
    let e = audit("dup-1", "acme", 1);
    let a = s.publish(Topic::AgentAudit, "k", &e).await.unwrap();
    let b = s.publish(Topic::AgentAudit, "k", &e).await.unwrap();
    assert!(!a.duplicate);
    if b.duplicate {
        assert_eq!((a.partition, a.offset), (b.partition, b.offset));
    }
    s.publish(Topic::AgentAudit, "k", &audit("dup-2", "acme", 2))
        .await
        .unwrap();
    // The same id from another tenant is another event.
    let other = s
        .publish(Topic::AgentAudit, "k", &audit("dup-1", "globex", 3))
        .await
        .unwrap();
    assert!(!other.duplicate, "ids are per tenant");
    let records = read_all(&*s, Topic::AgentAudit, 4).await;
    assert!(records.len() == 3 || records.len() == 4, "{records:?}");
    let mut dedup = Dedup::new(100);
    let ids: Vec<_> = records
        .iter()
        .filter(|r| dedup.first_time(&r.envelope))
        .map(|r| r.envelope.id.as_str())
        .collect();
    assert_eq!(ids, ["dup-1", "dup-2", "dup-1"]);
}

async fn typed_events_decode(s: Arc<dyn EventStream>) {
    let decision = PolicyDecision {
        query: "data.soma.allow".into(),
        allowed: false,
        reasons: vec!["tool shell is not allowed for tenant acme".into()],
        input_digest: "sha256:00".into(),
        policy_version: "7".into(),
    };
    let e = Envelope::new("pd-1", "acme", 9, &decision).unwrap();
    s.publish(Topic::PolicyDecisions, "acme", &e).await.unwrap();
    let records = read_all(&*s, Topic::PolicyDecisions, 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].envelope, e);
    assert_eq!(
        records[0].envelope.decode::<PolicyDecision>().unwrap(),
        decision
    );
    assert!(matches!(
        records[0].envelope.decode::<AuditEvent>(),
        Err(Error::Schema { .. })
    ));
}
