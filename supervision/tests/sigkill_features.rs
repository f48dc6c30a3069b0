//! SIGKILL under load for what the plain counter test does not cover: durable timers, dead
//! letters and their re-drive, the periodic durability mode and segment rolls (16 KiB
//! segments). A child process runs the workload and is SIGKILLed at a random moment, again
//! and again; then this process opens the journal, lets every timer fire and re-drives every
//! dead letter, and counts: every acknowledged message applied exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_supervision::{
    Backoff, Context, Durability, DurableActor, HandlerError, RegistryOptions, Runtime,
    RuntimeOptions,
};
use tokio::sync::mpsc;

const CHILD_DIR: &str = "SOMA_FEATURES_DIR";
const CHILD_MODE: &str = "SOMA_FEATURES_MODE";
const CHILD_ROUND: &str = "SOMA_FEATURES_ROUND";
const STRICT_KEY: &str = "s";

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Msg {
    Add(u64),
    /// Schedules `Add(id)` after `after_ms`.
    Later {
        id: u64,
        after_ms: u64,
    },
    /// Applied only while the key accepts; otherwise it fails (and is dead-lettered).
    Strict(u64),
    Accept(bool),
    Noop,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    added: Vec<u64>,
    accept: bool,
}

#[derive(Clone)]
struct Ledger {
    applied: Option<mpsc::UnboundedSender<u64>>,
}

impl DurableActor for Ledger {
    type Msg = Msg;
    type State = State;

    fn init(&self, _key: &str) -> State {
        State::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<Msg>,
        state: &mut State,
        msg: Msg,
    ) -> Result<(), HandlerError> {
        match msg {
            Msg::Add(id) => {
                state.added.push(id);
                if let Some(tx) = &self.applied {
                    let _ = tx.send(id);
                }
            }
            Msg::Later { id, after_ms } => {
                ctx.schedule(Duration::from_millis(after_ms), &Msg::Add(id))?;
            }
            Msg::Strict(id) if state.accept => state.added.push(id),
            Msg::Strict(id) => return Err(HandlerError::new(format!("{id} refused"))),
            Msg::Accept(on) => state.accept = on,
            Msg::Noop => {}
        }
        Ok(())
    }
}

fn runtime_options(dir: &Path, periodic: bool) -> RuntimeOptions {
    let mut o = RuntimeOptions::new(dir);
    o.journal.segment_bytes = 16 * 1024;
    o.journal.ranges = 4;
    if periodic {
        o.journal.durability = Durability::Periodic { interval_ms: 20 };
    }
    o
}

fn registry_options() -> RegistryOptions {
    let mut o = RegistryOptions::new("ledger");
    o.max_attempts = 1;
    o.backoff = Backoff::NONE;
    o.passivate_after_ms = None;
    o
}

/// The workload, until killed: adds, timers and strict messages over four keys; the strict
/// key refuses for the first 50 messages of a round (dead letters), then accepts, and its
/// dead letters are re-driven now and then. Prints `ack KIND ID` for every acknowledged send.
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
    let (tx, rx) = std_mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in rx {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    reg.send(STRICT_KEY, &Msg::Accept(false)).await.unwrap();
    for i in 0u64.. {
        let id = round * 1_000_000 + i;
        let (key, msg, kind) = match i % 10 {
            6 | 7 => (
                format!("k{}", i % 3),
                Msg::Later { id, after_ms: 30 },
                "later",
            ),
            8 => (STRICT_KEY.to_string(), Msg::Strict(id), "strict"),
            _ => (format!("k{}", i % 3), Msg::Add(id), "add"),
        };
        if i == 50 {
            reg.send(STRICT_KEY, &Msg::Accept(true)).await.unwrap();
        }
        if i > 50 && i % 25 == 0 {
            for letter in reg.dead_letters(Some(STRICT_KEY)).await.unwrap() {
                let new = reg.redrive(STRICT_KEY, letter.seq).await.unwrap();
                tx.send(format!("redrove {} {new}", letter.seq)).unwrap();
            }
        }
        reg.send(&key, &msg).await.unwrap();
        tx.send(format!("ack {kind} {id}")).unwrap();
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug, Default)]
struct Acked {
    add: BTreeSet<u64>,
    later: BTreeSet<u64>,
    strict: BTreeSet<u64>,
    redrives: usize,
}

fn run_rounds(dir: &Path, mode: &str, rounds: u64) -> Acked {
    let mut acked = Acked::default();
    for round in 1..=rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_workload",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir)
            .env(CHILD_MODE, mode)
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Killed after a random amount of acknowledged work, not of wall-clock time: on a
        // loaded machine a timed kill can land before the child has done anything.
        let kill_after = fastrand::usize(200..1200);
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < kill_after {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    record(&mut acked, &line);
                    seen += 1;
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    panic!("round {round}: {seen} lines in 60 s, the child made no progress")
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the child exited by itself before its SIGKILL"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in rx.try_iter() {
            record(&mut acked, &line);
        }
    }
    acked
}

fn record(acked: &mut Acked, line: &str) {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["ack", kind, id] => {
            let id: u64 = id.parse().unwrap();
            let set = match *kind {
                "add" => &mut acked.add,
                "later" => &mut acked.later,
                _ => &mut acked.strict,
            };
            set.insert(id);
        }
        ["redrove", _, _] => acked.redrives += 1,
        _ => {}
    }
}

async fn verify(dir: &Path, periodic: bool, acked: &Acked) {
    let (tx, mut applied) = mpsc::unbounded_channel();
    let rt = Runtime::open(runtime_options(dir, periodic)).await.unwrap();
    let reg = rt
        .registry(Ledger { applied: Some(tx) }, registry_options())
        .await
        .unwrap();
    let keys = ["k0", "k1", "k2", STRICT_KEY];
    // Everything accepted before is handled once a no-op sent after it is.
    for key in keys {
        let seq = reg.send(key, &Msg::Noop).await.unwrap();
        reg.wait_handled(key, seq).await.unwrap();
    }
    // Every dead letter goes back, now that the strict key accepts.
    let seq = reg.send(STRICT_KEY, &Msg::Accept(true)).await.unwrap();
    reg.wait_handled(STRICT_KEY, seq).await.unwrap();
    let mut last = seq;
    for letter in reg.dead_letters(Some(STRICT_KEY)).await.unwrap() {
        last = reg.redrive(STRICT_KEY, letter.seq).await.unwrap();
    }
    reg.wait_handled(STRICT_KEY, last).await.unwrap();
    assert!(reg.dead_letters(None).await.unwrap().is_empty());
    // Every acknowledged timer fires: wait for the ones not applied yet, by their events.
    let mut states = BTreeMap::new();
    loop {
        for key in keys {
            states.insert(key, reg.state(key).await.unwrap().added);
        }
        let seen: BTreeSet<u64> = states.values().flatten().copied().collect();
        let missing: Vec<u64> = acked.later.difference(&seen).copied().collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::timeout(Duration::from_secs(20), applied.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timers never fired: {} missing, e.g. {:?}",
                    missing.len(),
                    &missing[..missing.len().min(5)]
                )
            })
            .unwrap();
    }
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for ids in states.values() {
        for id in ids {
            *count.entry(*id).or_default() += 1;
        }
    }
    let twice: Vec<u64> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        twice.is_empty(),
        "{} applied twice, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    for (what, set) in [
        ("add", &acked.add),
        ("later", &acked.later),
        ("strict", &acked.strict),
    ] {
        let lost: Vec<u64> = set
            .iter()
            .filter(|id| !count.contains_key(id))
            .copied()
            .collect();
        assert!(
            lost.is_empty(),
            "{what}: {} acknowledged but lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
    println!(
        "acked: {} adds, {} timers, {} strict ({} re-drives during the rounds); applied {} ids, none twice",
        acked.add.len(),
        acked.later.len(),
        acked.strict.len(),
        acked.redrives,
        count.len()
    );
    rt.shutdown().await.unwrap();
}

fn scenario(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let acked = run_rounds(&path, mode, 8);
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
    rt.block_on(verify(&path, mode == "periodic", &acked));
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
