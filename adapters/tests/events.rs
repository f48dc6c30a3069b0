//! The embedded event log: the contract, restarts, and SIGKILL mid-publish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use soma_adapters::{Dedup, EventStream, SledLog, Topic, events_contract};

#[tokio::test]
async fn sled_log_passes_the_contract() {
    let root = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    events_contract::run(|| {
        let dir = root.path().join(
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .to_string(),
        );
        async move { Arc::new(SledLog::open(dir).unwrap()) as Arc<dyn EventStream> }
    })
    .await;
}

/// sled's flusher thread lets go of the directory's lock a moment after the last handle.
fn reopen(dir: &std::path::Path) -> SledLog {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match SledLog::open(dir) {
            Ok(log) => return log,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn a_reopened_log_keeps_events_offsets_groups_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SledLog::open(dir.path()).unwrap();
        for n in 0..10 {
            let e = events_contract::audit(&format!("r-{n}"), "acme", n);
            log.publish(Topic::AgentAudit, "k", &e).await.unwrap();
        }
        let mut c = log.consumer("g", Topic::AgentAudit).await.unwrap();
        let got = c.poll(4, Duration::ZERO).await.unwrap();
        c.commit(&got).await.unwrap();
    }
    let log = SledLog::open(dir.path()).unwrap();
    assert_eq!(log.end_offset(Topic::AgentAudit), 10);
    let again = events_contract::audit("r-3", "acme", 3);
    let r = log.publish(Topic::AgentAudit, "k", &again).await.unwrap();
    assert!(r.duplicate && r.offset == 3, "{r:?}");
    let e = events_contract::audit("r-10", "acme", 10);
    assert_eq!(
        log.publish(Topic::AgentAudit, "k", &e)
            .await
            .unwrap()
            .offset,
        10
    );
    let mut c = log.consumer("g", Topic::AgentAudit).await.unwrap();
    let rest = c.poll(100, Duration::ZERO).await.unwrap();
    let offsets: Vec<u64> = rest.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (4..=10).collect::<Vec<_>>());
    drop(c);
    // Trimmed events are gone; readers and offsets go on from what is left.
    assert_eq!(log.trim_before(Topic::AgentAudit, 8).await.unwrap(), 8);
    let left = log
        .read(Topic::AgentAudit, 0, 0, 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(left.first().map(|r| r.offset), Some(8));
    // A trim never goes back, nor past the durable end.
    assert_eq!(log.trim_before(Topic::AgentAudit, 2).await.unwrap(), 0);
    assert_eq!(log.trim_before(Topic::AgentAudit, 1_000).await.unwrap(), 3);
    drop(log);
    let log = reopen(dir.path());
    assert_eq!(log.end_offset(Topic::AgentAudit), 11);
    let e = events_contract::audit("r-11", "acme", 11);
    assert_eq!(
        log.publish(Topic::AgentAudit, "k", &e)
            .await
            .unwrap()
            .offset,
        11
    );
}

/// The child side of the SIGKILL test: publishes numbered events as fast as it can (several
/// tasks at once) and prints each id once it is acknowledged. Run only by that test
/// (`--ignored --exact`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkill_mid_publish_loses_nothing_acknowledged; run by that test"]
async fn child_publisher() {
    let dir = common::child_dir("sigkill_mid_publish_loses_nothing_acknowledged");
    let round: u64 = common::child_round();
    let log = SledLog::open(dir).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for task in 0..4u64 {
        let log = log.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let id = format!("{round}-{task}-{n}");
                let e = events_contract::audit(&id, "acme", n);
                log.publish(Topic::AgentAudit, &format!("t{task}"), &e)
                    .await
                    .unwrap();
                tx.send(id).unwrap();
            }
        });
    }
    let mut out = std::io::stdout().lock();
    while let Some(id) = rx.recv().await {
        writeln!(out, "{id}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_mid_publish_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let acked = common::sigkill_rounds("child_publisher", dir.path(), 6, 300, 400);
    assert!(
        acked.len() > 100,
        "the child published too little: {}",
        acked.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let records = rt.block_on(async {
        let log = SledLog::open(dir.path()).unwrap();
        log.read(Topic::AgentAudit, 0, 0, usize::MAX, Duration::ZERO)
            .await
            .unwrap()
    });
    let mut dedup = Dedup::new(records.len() + 1);
    let twice: Vec<_> = records
        .iter()
        .filter(|r| !dedup.first_time(&r.envelope))
        .collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(
        offsets,
        (0..records.len() as u64).collect::<Vec<_>>(),
        "offsets are dense"
    );
    let stored: HashSet<&str> = records.iter().map(|r| r.envelope.id.as_str()).collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| !stored.contains(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    println!(
        "6 SIGKILLs: {} acknowledged, {} stored (acked + cut by the kill), 0 lost, 0 twice",
        acked.len(),
        records.len()
    );
}
