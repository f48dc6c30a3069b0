//! Durability under SIGKILL: a child process hosts durable counters; this test feeds them,
//! SIGKILLs the child at random moments 24 times, restarts it each time, and proves at the
//! end that every acknowledged message was applied exactly once, in the order of its
//! sequence number, and that no host died by itself before its SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

// The demo's host and ledger are the binary's, not the library's public API.
#[allow(dead_code)]
#[path = "../src/demo.rs"]
mod demo;

use demo::{Host, Ledger, key_of};

const ROUNDS: u32 = 24;
const KEYS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message_and_applies_none_twice() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_soma"));
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::default();
    let mut rounds_with_acks = 0;
    for _ in 0..ROUNDS {
        let host = Host::spawn(&exe, dir.path()).await.unwrap();
        let kill_after = Duration::from_millis(fastrand::u64(10..250));
        let acks = ledger
            .crash_round(host, 2_000, KEYS, kill_after)
            .await
            .unwrap();
        if acks > 0 {
            rounds_with_acks += 1;
        }
    }
    let mut host = Host::spawn(&exe, dir.path()).await.unwrap();
    let keys: Vec<String> = (0..KEYS as u64).map(|k| key_of(k, KEYS)).collect();
    let states = host.dump(&keys).await.unwrap();
    let report = ledger.verify(&states, KEYS);
    println!("{report}");
    assert_eq!(
        report.kills, ROUNDS,
        "every round must end with a SIGKILL of a live host: {report}"
    );
    assert_eq!(report.exited_by_itself, 0, "{report}");
    assert!(report.seq_conflicts.is_empty(), "{report}");
    assert!(
        report.out_of_order.is_empty(),
        "applied out of order: {:?}",
        report.out_of_order
    );
    assert!(
        rounds_with_acks >= ROUNDS / 2,
        "kills must land mid-work: {report}"
    );
    assert!(report.acked > 0);
    assert!(
        report.lost.is_empty(),
        "acknowledged but lost: {:?}",
        report.lost
    );
    assert!(
        report.duplicates.is_empty(),
        "applied twice: {:?}",
        report.duplicates
    );
    assert!(
        report.unknown.is_empty(),
        "never sent or misrouted: {:?}",
        report.unknown
    );
    assert!(
        report.count_mismatches.is_empty(),
        "count != record: {:?}",
        report.count_mismatches
    );
    assert_eq!(
        states.values().map(|(c, _)| *c as usize).sum::<usize>(),
        report.acked + report.applied_unacked,
        "state = acknowledged + those whose ack the kill cut"
    );
}
