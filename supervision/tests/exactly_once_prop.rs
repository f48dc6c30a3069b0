//! Property: any interleaving of sends, actor kills, crashes of the whole runtime (staged
//! commits lost, nothing flushed on the way out) and clean shutdowns applies every
//! acknowledged message exactly once, in sequence order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{Counter, Msg, options};
use proptest::prelude::*;
use soma_supervision::{Registry, Runtime, RuntimeOptions, SledJournal};

#[derive(Debug, Clone)]
enum Op {
    /// `n` concurrent sends to one key, all awaited (acknowledged).
    Send { key: u8, n: u8 },
    /// Kill the key's live instance as a crash would.
    Kill { key: u8 },
    /// Crash the whole runtime: the journal loses its staged commits and writes nothing
    /// more, every task is dropped mid-work; then reopen.
    Crash,
    /// Shut the runtime down cleanly and reopen.
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..3, 1u8..8).prop_map(|(key, n)| Op::Send { key, n }),
        2 => (0u8..3).prop_map(|key| Op::Kill { key }),
        1 => Just(Op::Crash),
        1 => Just(Op::Shutdown),
    ]
}

struct Life {
    tokio: tokio::runtime::Runtime,
    journal: SledJournal,
    rt: Runtime,
    reg: Registry<Counter>,
}

fn open(path: &Path) -> Life {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rt_options = RuntimeOptions::new(path);
    let journal = SledJournal::open(rt_options.journal.clone()).unwrap();
    let (rt, reg) = tokio.block_on(async {
        let rt = Runtime::with_journal(std::sync::Arc::new(journal.clone()), &rt_options)
            .await
            .unwrap();
        let reg = rt.registry(Counter::new(), options("p")).await.unwrap();
        (rt, reg)
    });
    Life {
        tokio,
        journal,
        rt,
        reg,
    }
}

/// Ends a life (its tasks dropped wherever they are) and opens the journal again.
fn reopen(life: Life, path: &Path) -> Life {
    let Life {
        tokio,
        journal,
        rt,
        reg,
    } = life;
    drop((reg, rt, journal));
    tokio.shutdown_timeout(Duration::from_secs(5));
    open(path)
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    // key -> (seq -> id) of acknowledged sends
    let mut acked: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut life = open(&path);
    for op in ops {
        match op {
            Op::Send { key, n } => {
                let key = format!("k{key}");
                let ids: Vec<u64> = (next_id..next_id + n as u64).collect();
                next_id += n as u64;
                let reg = life.reg.clone();
                let k = key.clone();
                let seqs = life.tokio.block_on(async move {
                    let sends = ids.iter().map(|id| {
                        let reg = reg.clone();
                        let k = k.clone();
                        let id = *id;
                        tokio::spawn(
                            async move { (reg.send(&k, &Msg::Add(id)).await.unwrap(), id) },
                        )
                    });
                    let mut out = Vec::new();
                    for s in sends {
                        out.push(s.await.unwrap());
                    }
                    out
                });
                acked.entry(key).or_default().extend(seqs);
            }
            Op::Kill { key } => {
                life.reg.kill(&format!("k{key}"));
            }
            Op::Crash => {
                life.journal.crash();
                life = reopen(life, &path);
            }
            Op::Shutdown => {
                life.tokio.block_on(life.rt.shutdown()).unwrap();
                life = reopen(life, &path);
            }
        }
    }
    let reg = life.reg.clone();
    life.tokio.block_on(async move {
        for (key, by_seq) in &acked {
            let last = *by_seq.keys().last().unwrap();
            reg.wait_handled(key, last).await.unwrap();
            // A message being replayed when the process died, again and again, is moved to
            // the dead letters (crash-loop protection): it is kept there, never lost.
            let dead: Vec<u64> = reg
                .dead_letters(Some(key))
                .await
                .unwrap()
                .into_iter()
                .map(|d| {
                    assert!(
                        d.error.contains("the process died while handling it"),
                        "{d:?}"
                    );
                    by_seq[&d.seq]
                })
                .collect();
            let state = reg.state(key).await.unwrap();
            let expected: Vec<u64> = by_seq
                .values()
                .copied()
                .filter(|id| !dead.contains(id))
                .collect();
            assert_eq!(
                state.ids, expected,
                "{key}: exactly once, in sequence order (dead letters: {dead:?})"
            );
            assert_eq!(state.count, expected.len() as u64);
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn interleaved_sends_kills_and_restarts_apply_each_message_once(
        ops in proptest::collection::vec(op(), 1..30)
    ) {
        run(ops);
    }
}
