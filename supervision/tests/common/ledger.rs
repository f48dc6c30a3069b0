//! A SIGKILL workload for any journal backend: a ledger actor that records the ids it
//! applies, sent adds, durable timers and strict messages (dead-lettered while the strict
//! key refuses, then re-driven). A child process runs [`workload`] until its parent SIGKILLs
//! it ([`run_rounds`]); the parent then lets every timer fire and every dead letter go back
//! ([`verify`]) and counts: every acknowledged id applied exactly once.
//!
//! Shared by the sled test (`supervision/tests/sigkill_features.rs`) and the Redis one
//! (`cluster/tests/redis_sigkill.rs`), which include this file by path.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_supervision::{
    Backoff, Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime,
};
use tokio::sync::mpsc;

pub const STRICT_KEY: &str = "s";
pub const KEYS: [&str; 4] = ["k0", "k1", "k2", STRICT_KEY];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
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
pub struct State {
    pub added: Vec<u64>,
    pub accept: bool,
}

#[derive(Clone)]
pub struct Ledger {
    pub applied: Option<mpsc::UnboundedSender<u64>>,
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

pub fn registry_options() -> RegistryOptions {
    let mut o = RegistryOptions::new("ledger");
    o.max_attempts = 1;
    o.backoff = Backoff::NONE;
    o.passivate_after_ms = None;
    o
}

/// The workload, until killed: adds, timers and strict messages over four keys; the strict
/// key refuses for the first 50 messages of a round (dead letters), then accepts, and its
/// dead letters are re-driven now and then. Prints `ack KIND ID` for every acknowledged
/// send. A send that fails (the journal's server restarting) is not acknowledged and is not
/// printed; the workload goes on.
pub async fn workload(reg: Registry<Ledger>, round: u64) {
    let (tx, rx) = std_mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in rx {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    while reg.send(STRICT_KEY, &Msg::Accept(false)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
            while reg.send(STRICT_KEY, &Msg::Accept(true)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if i > 50 && i % 25 == 0 {
            for letter in reg.dead_letters(Some(STRICT_KEY)).await.unwrap_or_default() {
                if let Ok(new) = reg.redrive(STRICT_KEY, letter.seq).await {
                    tx.send(format!("redrove {} {new}", letter.seq)).unwrap();
                }
            }
        }
        match reg.send(&key, &msg).await {
            Ok(_) => tx.send(format!("ack {kind} {id}")).unwrap(),
            Err(_) => {
                tx.send(format!("failed {kind} {id}")).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug, Default)]
pub struct Acked {
    pub add: BTreeSet<u64>,
    pub later: BTreeSet<u64>,
    pub strict: BTreeSet<u64>,
    pub redrives: usize,
    pub failed: usize,
}

/// Runs `child_test` of this test binary `rounds` times with `env`, each killed (SIGKILL)
/// after a random number (200-1200) of output lines; `during(round, lines)` is called after
/// every line the child prints (to inject a fault of the parent's choosing mid-round).
pub fn run_rounds(
    child_test: &str,
    env: &[(&str, String)],
    round_var: &str,
    rounds: u64,
    mut during: impl FnMut(u64, usize),
) -> Acked {
    let mut acked = Acked::default();
    for round in 1..=rounds {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            child_test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(round_var, round.to_string())
        .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
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
                    during(round, seen);
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
        ["failed", _, _] => acked.failed += 1,
        _ => {}
    }
}

/// Opens the ledger on `rt` (its `applied` events feed the wait for timers), lets everything
/// pending be handled, every dead letter go back and every timer fire, then counts: each
/// acknowledged id applied once, none twice. Shuts `rt` down.
pub async fn verify(rt: Runtime, acked: &Acked) {
    let (tx, mut applied) = mpsc::unbounded_channel();
    let reg = rt
        .registry(Ledger { applied: Some(tx) }, registry_options())
        .await
        .unwrap();
    let handled = |key: &'static str, seq: u64| {
        let reg = reg.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), reg.wait_handled(key, seq))
                .await
                .unwrap_or_else(|_| panic!("{key} did not handle seq {seq} within 60 s"))
                .unwrap();
        }
    };
    // Everything accepted before is handled once a no-op sent after it is.
    for key in KEYS {
        let seq = reg.send(key, &Msg::Noop).await.unwrap();
        handled(key, seq).await;
    }
    // Every dead letter goes back, now that the strict key accepts.
    let seq = reg.send(STRICT_KEY, &Msg::Accept(true)).await.unwrap();
    handled(STRICT_KEY, seq).await;
    let mut last = seq;
    for letter in reg.dead_letters(Some(STRICT_KEY)).await.unwrap() {
        last = reg.redrive(STRICT_KEY, letter.seq).await.unwrap();
    }
    handled(STRICT_KEY, last).await;
    assert!(reg.dead_letters(None).await.unwrap().is_empty());
    // Every acknowledged timer fires: wait for the ones not applied yet, by their events.
    let mut states = BTreeMap::new();
    loop {
        for key in KEYS {
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
        "acked: {} adds, {} timers, {} strict ({} re-drives, {} failed sends during the rounds); \
         applied {} ids, none twice",
        acked.add.len(),
        acked.later.len(),
        acked.strict.len(),
        acked.redrives,
        acked.failed,
        count.len()
    );
    rt.shutdown().await.unwrap();
}
