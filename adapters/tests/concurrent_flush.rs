//! Many concurrent durable writes to the embedded stores all complete: sled 0.34's
//! `flush_async` deadlocks when called concurrently (spacejam/sled#1308), which once hung a
//! node whose decisions were published from several requests at once.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use soma_adapters::{
    AuditEvent, Entry, Envelope, EpisodicMemory, EventStream, Outcome, Scope, SledEpisodic,
    SledLog, Topic,
};

const WRITERS: usize = 64;
const EACH: usize = 20;

/// The writes run on their own runtime and thread: a deadlocked flush can block that
/// runtime's threads, so the test waits for them from outside and fails after a deadline.
#[test]
fn concurrent_publishes_and_appends_all_complete() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(writes());
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("concurrent durable writes did not complete: a flush deadlocked");
}

async fn writes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(SledLog::open(dir.path().join("events")).unwrap());
    let episodic = Arc::new(SledEpisodic::open(dir.path().join("episodic")).unwrap());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (log, episodic) = (log.clone(), episodic.clone());
        tasks.push(tokio::spawn(async move {
            let scope = Scope::new("acme", format!("s{w}")).unwrap();
            for i in 0..EACH {
                let event = AuditEvent {
                    actor: format!("agent/{w}"),
                    action: "tool.call".into(),
                    outcome: Outcome::Succeeded,
                    session: None,
                    detail: serde_json::Value::Null,
                };
                let envelope = Envelope::new(format!("{w}-{i}"), "acme", 1, &event).unwrap();
                log.publish(Topic::AgentAudit, "acme", &envelope)
                    .await
                    .unwrap();
                let entry = Entry {
                    at_ms: 1 + i as u64,
                    role: "user".into(),
                    content: format!("{w}-{i}"),
                    metadata: serde_json::Value::Null,
                };
                episodic.append(&scope, entry).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let records = log
        .read(Topic::AgentAudit, 0, 0, WRITERS * EACH + 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(records.len(), WRITERS * EACH);
}
