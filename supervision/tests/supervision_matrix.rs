//! The supervision matrix: a panic in start, handle and stop, under each strategy; restart
//! intensity exceeded escalates to the parent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, call};
use soma_supervision::{
    Backoff, ChildSpec, Intensity, Policy, Restart, Strategy, Supervisor, SupervisorMsg,
};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Start,
    Handle,
    Stop,
}

/// A child that reports every start attempt and fails where it is told to.
struct Probe {
    name: &'static str,
    incarnation: u32,
    /// Panic in `pre_start` on this incarnation.
    panic_start_on: Option<u32>,
    panic_in_stop: bool,
    starts: mpsc::UnboundedSender<(&'static str, u32)>,
}

enum ProbeMsg {
    Crash,
    StopMe,
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<ProbeMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        let _ = self.starts.send((self.name, self.incarnation));
        if self.panic_start_on == Some(self.incarnation) {
            panic!("{} panics in start", self.name);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProbeMsg>,
        msg: ProbeMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProbeMsg::Crash => panic!("{} panics in handle", self.name),
            ProbeMsg::StopMe => myself.stop(None),
        }
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<ProbeMsg>, _: &mut ()) -> Result<(), ActorProcessingErr> {
        if self.panic_in_stop {
            panic!("{} panics in stop", self.name);
        }
        Ok(())
    }
}

struct Harness {
    sup: ActorRef<SupervisorMsg>,
    starts: mpsc::UnboundedReceiver<(&'static str, u32)>,
    counts: HashMap<&'static str, u32>,
}

fn probe_spec(
    name: &'static str,
    fault_here: Option<Fault>,
    tx: mpsc::UnboundedSender<(&'static str, u32)>,
) -> ChildSpec {
    let incarnations = Arc::new(AtomicU32::new(0));
    ChildSpec::new(name, Restart::Transient, move || {
        let incarnation = incarnations.fetch_add(1, Ordering::SeqCst) + 1;
        let probe = Probe {
            name,
            incarnation,
            // Fault::Start: the restart after the crash panics once, the next one succeeds.
            panic_start_on: (fault_here == Some(Fault::Start)).then_some(2),
            panic_in_stop: fault_here == Some(Fault::Stop) && incarnation == 1,
            starts: tx.clone(),
        };
        (probe, ())
    })
}

fn policy(strategy: Strategy, max_restarts: u32) -> Policy {
    Policy {
        strategy,
        intensity: Intensity {
            max_restarts,
            window_ms: 60_000,
        },
        backoff: Backoff {
            initial_ms: 1,
            max_ms: 5,
            multiplier: 2.0,
            jitter: 0.5,
        },
    }
}

impl Harness {
    async fn start(strategy: Strategy, fault: Fault) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let children = vec![
            probe_spec("a", None, tx.clone()),
            probe_spec("b", Some(fault), tx.clone()),
            probe_spec("c", None, tx),
        ];
        let sup = Supervisor::start("matrix", policy(strategy, 10), children, None)
            .await
            .unwrap();
        let mut h = Self {
            sup,
            starts: rx,
            counts: HashMap::new(),
        };
        h.wait_for(&[("a", 1), ("b", 1), ("c", 1)]).await;
        h
    }

    async fn child(&self, name: &str) -> ActorRef<ProbeMsg> {
        let children = call!(self.sup, SupervisorMsg::Children).unwrap();
        let cell = children
            .into_iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c)
            .unwrap_or_else(|| panic!("{name} is not running"));
        cell.into()
    }

    /// Waits until start counts reach `expected`.
    async fn wait_for(&mut self, expected: &[(&'static str, u32)]) {
        let done = |counts: &HashMap<&'static str, u32>| {
            expected
                .iter()
                .all(|(n, c)| counts.get(n).copied().unwrap_or(0) >= *c)
        };
        while !done(&self.counts) {
            let (name, _) = tokio::time::timeout(Duration::from_secs(10), self.starts.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out; starts so far {:?}", self.counts))
                .unwrap();
            *self.counts.entry(name).or_default() += 1;
        }
    }

    /// Checks the exact start counts once every child is running again.
    async fn settle(&mut self, expected: &[(&'static str, u32)]) {
        self.wait_for(expected).await;
        for (name, _) in expected {
            self.child(name).await; // running
        }
        while let Ok((name, _)) = self.starts.try_recv() {
            *self.counts.entry(name).or_default() += 1;
        }
        let expected: HashMap<&'static str, u32> = expected.iter().copied().collect();
        assert_eq!(self.counts, expected);
    }
}

async fn inject(h: &Harness, fault: Fault) {
    let b = h.child("b").await;
    match fault {
        Fault::Start | Fault::Handle => b.cast(ProbeMsg::Crash).unwrap(),
        Fault::Stop => b.cast(ProbeMsg::StopMe).unwrap(),
    }
}

/// Expected start attempts per child after the fault in `b`.
fn expected(strategy: Strategy, fault: Fault) -> Vec<(&'static str, u32)> {
    // A panic in start costs one more attempt of b.
    let b = if fault == Fault::Start { 3 } else { 2 };
    match strategy {
        Strategy::OneForOne => vec![("a", 1), ("b", b), ("c", 1)],
        Strategy::OneForAll => vec![("a", 2), ("b", b), ("c", 2)],
        Strategy::RestForOne => vec![("a", 1), ("b", b), ("c", 2)],
    }
}

async fn case(strategy: Strategy, fault: Fault) {
    let mut h = Harness::start(strategy, fault).await;
    inject(&h, fault).await;
    h.settle(&expected(strategy, fault)).await;
    h.sup.stop(None);
}

#[tokio::test]
async fn one_for_one_panic_in_handle_restarts_only_the_child() {
    case(Strategy::OneForOne, Fault::Handle).await;
}

#[tokio::test]
async fn one_for_one_panic_in_start_is_retried_with_backoff() {
    case(Strategy::OneForOne, Fault::Start).await;
}

#[tokio::test]
async fn one_for_one_panic_in_stop_restarts_the_child() {
    case(Strategy::OneForOne, Fault::Stop).await;
}

#[tokio::test]
async fn one_for_all_panic_in_handle_restarts_every_child() {
    case(Strategy::OneForAll, Fault::Handle).await;
}

#[tokio::test]
async fn one_for_all_panic_in_start_is_retried_with_backoff() {
    case(Strategy::OneForAll, Fault::Start).await;
}

#[tokio::test]
async fn one_for_all_panic_in_stop_restarts_every_child() {
    case(Strategy::OneForAll, Fault::Stop).await;
}

#[tokio::test]
async fn rest_for_one_panic_in_handle_restarts_the_child_and_later_ones() {
    case(Strategy::RestForOne, Fault::Handle).await;
}

#[tokio::test]
async fn rest_for_one_panic_in_start_is_retried_with_backoff() {
    case(Strategy::RestForOne, Fault::Start).await;
}

#[tokio::test]
async fn rest_for_one_panic_in_stop_restarts_the_child_and_later_ones() {
    case(Strategy::RestForOne, Fault::Stop).await;
}

#[tokio::test(start_paused = true)]
async fn normal_stop_of_a_transient_child_is_not_restarted() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sup = Supervisor::start(
        "transient",
        policy(Strategy::OneForOne, 10),
        vec![probe_spec("a", None, tx)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(rx.recv().await, Some(("a", 1)));
    let child = |sup: &ActorRef<SupervisorMsg>| {
        let sup = sup.clone();
        async move {
            let children = call!(sup, SupervisorMsg::Children).unwrap();
            children[0].1.clone().map(ActorRef::<ProbeMsg>::from)
        }
    };
    // Control: a crash of the same transient child does restart it (after its backoff).
    child(&sup).await.unwrap().cast(ProbeMsg::Crash).unwrap();
    assert_eq!(rx.recv().await, Some(("a", 2)));
    child(&sup).await.unwrap().cast(ProbeMsg::StopMe).unwrap();
    // Wait until the supervisor has seen the exit, then for longer than any backoff (the
    // clock is paused: this sleep passes at once, and so would a restart's delay).
    while child(&sup).await.is_some() {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(rx.try_recv().is_err(), "no restart after a normal stop");
    assert!(child(&sup).await.is_none());
}

#[tokio::test]
async fn exceeding_restart_intensity_escalates_to_the_parent() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let inner_tx = tx.clone();
    // The inner supervisor allows 2 restarts; its child is crashed 3 times.
    let inner = ChildSpec::new("inner", Restart::Permanent, move || {
        let child = probe_spec("worker", None, inner_tx.clone());
        (
            Supervisor::new("inner", policy(Strategy::OneForOne, 2)),
            vec![child],
        )
    });
    let outer = Supervisor::start("outer", policy(Strategy::OneForOne, 5), vec![inner], None)
        .await
        .unwrap();
    let mut starts = 0;
    async fn next_start(rx: &mut mpsc::UnboundedReceiver<(&'static str, u32)>) {
        let (name, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(name, "worker");
    }
    next_start(&mut rx).await;
    starts += 1;
    let inner_ref = || async {
        let children = call!(outer, SupervisorMsg::Children).unwrap();
        let cell = children[0].1.clone().expect("inner is running");
        ActorRef::<SupervisorMsg>::from(cell)
    };
    let first_inner = inner_ref().await;
    for _ in 0..3 {
        let children = call!(first_inner, SupervisorMsg::Children).unwrap();
        let worker: ActorRef<ProbeMsg> = children[0].1.clone().unwrap().into();
        worker.cast(ProbeMsg::Crash).unwrap();
        next_start(&mut rx).await;
        starts += 1;
    }
    // Two restarts by the inner supervisor, then it failed and the outer one restarted it,
    // which started a fresh worker.
    assert_eq!(starts, 4);
    let second_inner = inner_ref().await;
    assert_ne!(
        first_inner.get_id(),
        second_inner.get_id(),
        "the inner supervisor was replaced"
    );
    outer.stop(None);
}
