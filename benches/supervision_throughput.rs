//! P1: local message throughput through a supervised actor (no durability), against raw
//! ractor doing the same work, and against Erlang/OTP (ping-pong and 64-sender fan-in).
//!
//! `cargo bench --bench supervision_throughput`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::process::Command;
use std::time::Instant;

use common::{fmt_rate, median, rate};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, call};
use soma::{ChildSpec, Policy, Restart, Supervisor, supervision::SupervisorMsg};
use tokio::sync::oneshot;

const ROUND_TRIPS: u64 = 200_000;
const SENDERS: u64 = 64;
const PER_SENDER: u64 = 20_000;
const ROUNDS: usize = 4;

enum Work {
    Ping(u64, RpcReplyPort<u64>),
    Add,
    /// Arms the counter: reply when `n` adds have arrived.
    Expect(u64, oneshot::Sender<()>),
}

struct Worker;

struct Count {
    seen: u64,
    want: Option<(u64, oneshot::Sender<()>)>,
}

impl Actor for Worker {
    type Msg = Work;
    type State = Count;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Work>, _: ()) -> Result<Count, ActorProcessingErr> {
        Ok(Count {
            seen: 0,
            want: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Work>,
        msg: Work,
        st: &mut Count,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Work::Ping(x, reply) => {
                let _ = reply.send(x + 1);
            }
            Work::Add => {
                st.seen += 1;
                if st.want.as_ref().is_some_and(|(n, _)| st.seen >= *n)
                    && let Some((_, tx)) = st.want.take()
                {
                    let _ = tx.send(());
                }
            }
            Work::Expect(n, tx) => st.want = Some((st.seen + n, tx)),
        }
        Ok(())
    }
}

async fn raw_worker() -> ActorRef<Work> {
    Actor::spawn(None, Worker, ())
        .await
        .map(|(r, _)| r)
        .unwrap()
}

async fn supervised_worker() -> (ActorRef<Work>, ActorRef<SupervisorMsg>) {
    let spec = ChildSpec::new("worker", Restart::Permanent, || (Worker, ()));
    let sup = Supervisor::start("bench", Policy::default(), vec![spec], None)
        .await
        .unwrap();
    let children = call!(sup, SupervisorMsg::Children).unwrap();
    let cell = children[0].1.clone().unwrap();
    (cell.into(), sup)
}

async fn ping_pong(w: &ActorRef<Work>) -> f64 {
    let started = Instant::now();
    for i in 0..ROUND_TRIPS {
        let r = call!(w, Work::Ping, i).unwrap();
        assert_eq!(r, i + 1);
    }
    rate(ROUND_TRIPS, started.elapsed())
}

async fn fan_in(w: &ActorRef<Work>) -> f64 {
    let total = SENDERS * PER_SENDER;
    let (tx, rx) = oneshot::channel();
    w.cast(Work::Expect(total, tx)).unwrap();
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let w = w.clone();
            tokio::spawn(async move {
                for _ in 0..PER_SENDER {
                    w.cast(Work::Add).unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    rx.await.unwrap();
    rate(total, started.elapsed())
}

struct Sample {
    raw_pp: Vec<f64>,
    sup_pp: Vec<f64>,
    raw_fi: Vec<f64>,
    sup_fi: Vec<f64>,
}

fn measure(rt: &tokio::runtime::Runtime) -> Sample {
    rt.block_on(async {
        let raw = raw_worker().await;
        let (sup, supervisor) = supervised_worker().await;
        let mut s = Sample {
            raw_pp: vec![],
            sup_pp: vec![],
            raw_fi: vec![],
            sup_fi: vec![],
        };
        // Warm up both, then alternate A B A B.
        ping_pong(&raw).await;
        ping_pong(&sup).await;
        for _ in 0..ROUNDS {
            s.raw_pp.push(ping_pong(&raw).await);
            s.sup_pp.push(ping_pong(&sup).await);
            // Alternate which goes first: the second of a pair inherits the first's heap.
            if s.raw_fi.len().is_multiple_of(2) {
                s.raw_fi.push(fan_in(&raw).await);
                s.sup_fi.push(fan_in(&sup).await);
            } else {
                s.sup_fi.push(fan_in(&sup).await);
                s.raw_fi.push(fan_in(&raw).await);
            }
        }
        raw.stop(None);
        supervisor.stop(None);
        s
    })
}

fn erlang() -> Option<(f64, f64)> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peers/erlang_bench.erl"
    );
    let mut pp = Vec::new();
    let mut fi = Vec::new();
    for _ in 0..ROUNDS {
        let out = Command::new("escript")
            .arg(script)
            .arg(ROUND_TRIPS.to_string())
            .arg(PER_SENDER.to_string())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse::<f64>().ok())
        };
        pp.push(field("pingpong_per_s=")?);
        fi.push(field("fanin_per_s=")?);
    }
    Some((median(pp), median(fi)))
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    println!("P1 local throughput, {}", common::machine());
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = measure(&current);
    let m = measure(&multi);
    let e = erlang();
    println!(
        "{:<44} {:>14} {:>14}",
        "workload", "current-thread", "multi-thread"
    );
    let row = |name: &str, a: &[f64], b: &[f64]| {
        println!(
            "{name:<44} {:>14} {:>14}",
            fmt_rate(median(a.to_vec())),
            fmt_rate(median(b.to_vec()))
        );
    };
    row("ping-pong round trips/s, raw ractor", &c.raw_pp, &m.raw_pp);
    row(
        "ping-pong round trips/s, soma supervised",
        &c.sup_pp,
        &m.sup_pp,
    );
    row(
        "fan-in (64 senders) msg/s, raw ractor",
        &c.raw_fi,
        &m.raw_fi,
    );
    row(
        "fan-in (64 senders) msg/s, soma supervised",
        &c.sup_fi,
        &m.sup_fi,
    );
    let (pp, fi) = (median(c.sup_pp.clone()), median(c.sup_fi.clone()));
    match e {
        Some((epp, efi)) => {
            println!(
                "{:<44} {:>14}",
                "ping-pong round trips/s, Erlang/OTP",
                fmt_rate(epp)
            );
            println!(
                "{:<44} {:>14}",
                "fan-in (64 senders) msg/s, Erlang/OTP",
                fmt_rate(efi)
            );
            println!(
                "ratio vs Erlang/OTP (current-thread): ping-pong {:.2}x, fan-in {:.2}x",
                pp / epp,
                fi / efi
            );
        }
        None => println!("Erlang/OTP peer unavailable (install erlang-nox for escript)"),
    }
    println!(
        "ratio supervised / raw ractor (current-thread): ping-pong {:.2}x, fan-in {:.2}x",
        pp / median(c.raw_pp.clone()),
        fi / median(c.raw_fi.clone())
    );
}
