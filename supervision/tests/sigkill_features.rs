//! SIGKILL under load for what the plain counter test does not cover: durable timers, dead
//! letters and their re-drive, the periodic durability mode and segment rolls (16 KiB
//! segments). A child process runs the workload and is SIGKILLed at a random moment, again
//! and again; then this process opens the journal, lets every timer fire and re-drives every
//! dead letter, and counts: every acknowledged message applied exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/ledger.rs"]
mod ledger;

use std::path::Path;

use ledger::{Ledger, registry_options};
use soma_supervision::{Durability, Runtime, RuntimeOptions};

const CHILD_DIR: &str = "SOMA_FEATURES_DIR";
const CHILD_MODE: &str = "SOMA_FEATURES_MODE";
const CHILD_ROUND: &str = "SOMA_FEATURES_ROUND";

fn runtime_options(dir: &Path, periodic: bool) -> RuntimeOptions {
    let mut o = RuntimeOptions::new(dir);
    o.journal.segment_bytes = 16 * 1024;
    o.journal.ranges = 4;
    if periodic {
        o.journal.durability = Durability::Periodic { interval_ms: 20 };
    }
    o
}

/// The ledger workload on a sled journal, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkill_with_timers_dead_letters_and_redrives_*; run by them"]
async fn child_workload() {
    let dir = std::env::var_os(CHILD_DIR).unwrap_or_else(|| panic!("{CHILD_DIR} is not set"));
    let periodic = std::env::var(CHILD_MODE).unwrap() == "periodic";
    let round: u64 = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
    let rt = Runtime::open(runtime_options(Path::new(&dir), periodic))
        .await
        .unwrap();
    let reg = rt
        .registry(Ledger { applied: None }, registry_options())
        .await
        .unwrap();
    ledger::workload(reg, round).await;
}

fn scenario(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let env = [
        (CHILD_DIR, path.display().to_string()),
        (CHILD_MODE, mode.to_string()),
    ];
    let acked = ledger::run_rounds("child_workload", &env, CHILD_ROUND, 8, |_, _| {});
    assert_eq!(acked.failed, 0, "no send fails on a local journal");
    assert!(acked.add.len() > 500, "too little work: {acked:?}");
    assert!(
        acked.later.len() > 100 && acked.strict.len() > 50,
        "{acked:?}"
    );
    // Segments are numbered in order: one per open, one more per roll.
    let newest = std::fs::read_dir(path.join("inbox"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    assert!(
        newest > 8 + 2,
        "segments rolled during the rounds: newest is {newest}"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runtime = Runtime::open(runtime_options(&path, mode == "periodic"))
            .await
            .unwrap();
        ledger::verify(runtime, &acked).await;
    });
    println!("{mode}: newest segment {newest} after 8 rounds");
}

#[test]
fn sigkill_with_timers_dead_letters_and_redrives_loses_nothing_flushed_per_batch() {
    scenario("flush");
}

#[test]
fn sigkill_with_timers_dead_letters_and_redrives_loses_nothing_in_periodic_mode() {
    scenario("periodic");
}
