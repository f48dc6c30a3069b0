//! Durable actors in one process: handling, replay after a kill, dead letters, passivation,
//! timers across a restart, backpressure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Counter, Event, Msg, next_event, options};
use soma_supervision::{Error, Runtime, RuntimeOptions, WhenFull};

async fn runtime(dir: &tempfile::TempDir) -> Runtime {
    Runtime::open(RuntimeOptions::new(dir.path().join("journal")))
        .await
        .unwrap()
}

#[tokio::test]
async fn messages_are_handled_in_order_and_state_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    let mut last = 0;
    for id in 1..=50 {
        last = reg
            .send("tenant/acme/session/42", &Msg::Add(id))
            .await
            .unwrap();
    }
    assert_eq!(last, 50);
    reg.wait_handled("tenant/acme/session/42", last)
        .await
        .unwrap();
    let state = reg.state("tenant/acme/session/42").await.unwrap();
    assert_eq!(state.count, 50);
    assert_eq!(state.ids, (1..=50).collect::<Vec<_>>());
    let other = reg.state("tenant/acme/session/43").await.unwrap();
    assert_eq!(other.count, 0, "keys are isolated");
}

#[tokio::test]
async fn concurrent_senders_are_each_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for sender in 0..16u64 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..50u64 {
                last = reg.send("k", &Msg::Add(sender * 1000 + i)).await.unwrap();
            }
            last
        }));
    }
    let mut max = 0;
    for t in tasks {
        max = max.max(t.await.unwrap());
    }
    assert_eq!(max, 800);
    reg.wait_handled("k", max).await.unwrap();
    let mut ids = reg.state("k").await.unwrap().ids;
    ids.sort_unstable();
    let mut expected: Vec<u64> = (0..16u64)
        .flat_map(|s| (0..50).map(move |i| s * 1000 + i))
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn killed_actor_restarts_and_replays_unhandled_messages() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let reg = rt
        .registry(counter.clone(), options("counter"))
        .await
        .unwrap();
    // Block the actor inside a handler, queue more behind it, then kill it.
    reg.send("k", &Msg::Add(1)).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    reg.wait_handled("k", 1).await.unwrap();
    reg.send("k", &Msg::Gated(2)).await.unwrap();
    for id in 3..=10 {
        reg.send("k", &Msg::Add(id)).await.unwrap();
    }
    assert!(reg.kill("k"), "the actor was live");
    // The restarted instance starts from the committed state (one message) and replays.
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 1)
    );
    counter.gate.add_permits(1);
    reg.wait_handled("k", 10).await.unwrap();
    let state = reg.state("k").await.unwrap();
    assert_eq!(
        state.ids,
        (1..=10).collect::<Vec<_>>(),
        "each message exactly once, in order"
    );
}

#[tokio::test]
async fn failing_message_is_retried_and_its_partial_state_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    let seq = reg
        .send(
            "k",
            &Msg::FailThenAdd {
                id: 7,
                fail_times: 2,
            },
        )
        .await
        .unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    let state = reg.state("k").await.unwrap();
    assert_eq!(state.ids, vec![7], "two failed attempts left no trace");
    assert!(reg.dead_letters(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn poison_message_is_dead_lettered_and_the_actor_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let mut opts = options("counter");
    opts.max_attempts = 3;
    let reg = rt.registry(Counter::new(), opts).await.unwrap();
    reg.send("k", &Msg::Add(1)).await.unwrap();
    let poison = reg.send("k", &Msg::Poison).await.unwrap();
    let last = reg.send("k", &Msg::Add(3)).await.unwrap();
    reg.wait_handled("k", last).await.unwrap();
    let state = reg.state("k").await.unwrap();
    assert_eq!(
        state.ids,
        vec![1, 3],
        "the poison's partial change is discarded"
    );
    let dead = reg.dead_letters(Some("k")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key, "k");
    assert_eq!(dead[0].seq, poison);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].error.contains("poison message"),
        "{}",
        dead[0].error
    );
    assert!(reg.dead_letters(Some("other")).await.unwrap().is_empty());
}

#[tokio::test]
async fn dead_letter_can_be_redriven() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let mut opts = options("counter");
    opts.max_attempts = 1;
    let counter = Counter::new();
    let reg = rt.registry(counter.clone(), opts).await.unwrap();
    // Fails once: with one attempt allowed it is dead-lettered; re-driven, it succeeds.
    let seq = reg
        .send(
            "k",
            &Msg::FailThenAdd {
                id: 5,
                fail_times: 1,
            },
        )
        .await
        .unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    assert_eq!(reg.dead_letters(None).await.unwrap().len(), 1);
    let new_seq = reg.redrive("k", seq).await.unwrap();
    assert!(new_seq > seq);
    reg.wait_handled("k", new_seq).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![5]);
    assert!(reg.dead_letters(None).await.unwrap().is_empty());
    match reg.redrive("k", seq).await {
        Err(Error::NoSuchDeadLetter { key, seq: s }) => assert_eq!((key.as_str(), s), ("k", seq)),
        other => panic!("expected NoSuchDeadLetter, got {other:?}"),
    }
}

/// On tokio's paused clock: the idle seconds pass at once.
#[tokio::test(start_paused = true)]
async fn idle_actor_passivates_and_reactivates_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let mut opts = options("counter");
    opts.passivate_after_ms = Some(5_000);
    let reg = rt.registry(counter, opts).await.unwrap();
    let seq = reg.send("k", &Msg::Add(1)).await.unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    assert_eq!(next_event(&mut events).await, Event::Stopped("k".into()));
    let seq = reg.send("k", &Msg::Add(2)).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 1)
    );
    reg.wait_handled("k", seq).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1, 2]);
}

/// A timer an hour ahead survives a shutdown and fires after the reopen; on tokio's paused
/// clock the hour passes at once.
#[tokio::test(start_paused = true)]
async fn timer_fires_after_a_shutdown_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    {
        let rt = Runtime::open(RuntimeOptions::new(&path)).await.unwrap();
        let reg = rt
            .registry(Counter::new(), options("counter"))
            .await
            .unwrap();
        let seq = reg
            .send(
                "k",
                &Msg::Later {
                    id: 99,
                    after_ms: 3_600_000,
                },
            )
            .await
            .unwrap();
        reg.wait_handled("k", seq).await.unwrap();
        assert_eq!(reg.state("k").await.unwrap().count, 0);
        rt.shutdown().await.unwrap();
        assert!(matches!(
            reg.send("k", &Msg::Add(1)).await,
            Err(Error::Stopped { .. })
        ));
    }
    // The same directory opens again in the same process: nothing outlived the shutdown.
    let rt = Runtime::open(RuntimeOptions::new(&path)).await.unwrap();
    let (counter, mut events) = Counter::with_events();
    let reg = rt.registry(counter, options("counter")).await.unwrap();
    reg.wait_handled("k", 2).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    assert_eq!(reg.state("k").await.unwrap().ids, vec![99]);
    rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stopped_registry_can_be_started_again_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    let seq = reg.send("k", &Msg::Add(1)).await.unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    assert!(
        rt.registry(Counter::new(), options("counter"))
            .await
            .is_err(),
        "one registry per name"
    );
    reg.stop().await;
    let again = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    let seq = again.send("k", &Msg::Add(2)).await.unwrap();
    again.wait_handled("k", seq).await.unwrap();
    assert_eq!(again.state("k").await.unwrap().ids, vec![1, 2]);
}

#[tokio::test]
async fn full_mailbox_rejects_when_configured_to() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let mut opts = options("counter");
    opts.max_in_flight = 3;
    opts.when_full = WhenFull::Reject;
    let counter = Counter::new();
    let reg = rt.registry(counter.clone(), opts).await.unwrap();
    for id in 1..=3 {
        reg.send("k", &Msg::Gated(id)).await.unwrap();
    }
    match reg.send("k", &Msg::Gated(4)).await {
        Err(Error::MailboxFull { key, limit }) => assert_eq!((key.as_str(), limit), ("k", 3)),
        other => panic!("expected MailboxFull, got {other:?}"),
    }
    // Another key has its own mailbox.
    reg.send("other", &Msg::Add(1)).await.unwrap();
    counter.gate.add_permits(3);
    reg.wait_handled("k", 3).await.unwrap();
    let seq = reg.send("k", &Msg::Add(4)).await.unwrap();
    assert_eq!(seq, 4, "the rejected message never entered the journal");
    reg.wait_handled("k", 4).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn full_mailbox_makes_the_sender_wait_when_configured_to() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let mut opts = options("counter");
    opts.max_in_flight = 2;
    opts.when_full = WhenFull::Wait;
    let counter = Counter::new();
    let reg = rt.registry(counter.clone(), opts).await.unwrap();
    reg.send("k", &Msg::Gated(1)).await.unwrap();
    reg.send("k", &Msg::Gated(2)).await.unwrap();
    let waiting = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.send("k", &Msg::Add(3)).await })
    };
    // Two sends to another key become durable meanwhile (the writer is not what holds the
    // third send back), and the third is still waiting.
    for id in [10, 11] {
        let seq = reg.send("other", &Msg::Add(id)).await.unwrap();
        reg.wait_handled("other", seq).await.unwrap();
    }
    assert!(!waiting.is_finished(), "the third send waits for room");
    counter.gate.add_permits(2);
    let seq = waiting.await.unwrap().unwrap();
    assert_eq!(seq, 3);
    reg.wait_handled("k", 3).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1, 2, 3]);
}

#[tokio::test]
async fn bad_keys_and_options_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    for key in ["", "a\u{0}b", "line\nbreak"] {
        match reg.send(key, &Msg::Add(1)).await {
            Err(Error::InvalidKey { .. }) => {}
            other => panic!("key {key:?}: expected InvalidKey, got {other:?}"),
        }
    }
    let long = "x".repeat(2000);
    assert!(matches!(
        reg.send(&long, &Msg::Add(1)).await,
        Err(Error::InvalidKey { .. })
    ));
    let mut bad = options("other");
    bad.max_in_flight = 0;
    let e = rt.registry(Counter::new(), bad).await.unwrap_err();
    assert!(e.to_string().contains("registry.max_in_flight"), "{e}");
    let e = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already runs"), "{e}");
}

#[tokio::test]
async fn actor_failing_to_activate_is_retried_then_parked_and_its_messages_kept() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    counter
        .fail_activate
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut opts = options("counter");
    opts.intensity = soma_supervision::Intensity {
        max_restarts: 2,
        window_ms: 1_000,
    };
    let reg = rt.registry(counter.clone(), opts).await.unwrap();
    reg.send("k", &Msg::Add(1)).await.unwrap();
    // The first activation and two restarts fail; then the key is parked.
    for _ in 0..3 {
        assert_eq!(
            next_event(&mut events).await,
            Event::ActivationFailed("k".into())
        );
    }
    assert_eq!(reg.live(), 0);
    counter
        .fail_activate
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // A parked key accepts messages but does not restart for them, nor for an activation:
    // it waits out its window.
    let seq = reg.send("k", &Msg::Add(2)).await.unwrap();
    match reg.activate("k").await {
        Err(soma_supervision::Error::Parked { key, .. }) => assert_eq!(key, "k"),
        other => panic!("expected Parked, got {other:?}"),
    }
    assert!(events.try_recv().is_err(), "no activation while parked");
    // Once the window has passed it starts by itself, and nothing was lost.
    reg.wait_handled("k", seq).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1, 2]);
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    assert_eq!(
        counter
            .activation_failures
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

#[tokio::test]
async fn failure_inside_a_replay_batch_is_counted_against_the_right_state() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let mut opts = options("counter");
    opts.max_attempts = 2;
    let reg = rt.registry(counter.clone(), opts).await.unwrap();
    reg.send("k", &Msg::Gated(1)).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    reg.send("k", &Msg::Add(2)).await.unwrap();
    let bad = reg
        .send(
            "k",
            &Msg::FailThenAdd {
                id: 3,
                fail_times: 5,
            },
        )
        .await
        .unwrap();
    let last = reg.send("k", &Msg::Add(4)).await.unwrap();
    // Kill while blocked in the first message: the restart replays all four as a batch.
    assert!(reg.kill("k"));
    counter.gate.add_permits(3);
    reg.wait_handled("k", last).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1, 2, 4]);
    let dead = reg.dead_letters(Some("k")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].attempts), (bad, 2));
}

#[tokio::test]
async fn activate_warms_an_actor_without_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let reg = rt.registry(counter, options("counter")).await.unwrap();
    assert_eq!(reg.live(), 0);
    reg.activate("warm").await.unwrap();
    assert_eq!(reg.live(), 1);
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("warm".into(), 0)
    );
    reg.activate("warm").await.unwrap();
    assert_eq!(reg.live(), 1, "activating a live actor is a no-op");
    let stats = rt.writer_stats();
    assert_eq!(stats.messages, 0, "activation appends nothing");
}

#[tokio::test]
async fn stop_is_graceful_and_later_sends_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let reg = rt.registry(counter, options("counter")).await.unwrap();
    let seq = reg.send("k", &Msg::Add(1)).await.unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    reg.stop().await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Stopped("k".into()),
        "on_stop ran"
    );
    assert!(matches!(
        reg.send("k", &Msg::Add(2)).await,
        Err(Error::Stopped { .. })
    ));
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1]);
}

#[tokio::test]
async fn oversized_message_is_refused_before_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    reg.send("k", &Msg::Add(1)).await.unwrap();
    let encoded = soma_supervision::MAX_MESSAGE_BYTES + 1;
    let huge = HugeMsg(vec![0u8; encoded]);
    let big_reg = rt.registry(HugeSink, options("huge")).await.unwrap();
    match big_reg.send("k", &huge).await {
        Err(Error::Encode { what, detail }) => {
            assert_eq!(what, "message");
            assert!(detail.contains("exceed the limit"), "{detail}");
        }
        other => panic!("expected Encode, got {other:?}"),
    }
    assert_eq!(
        rt.writer_stats().messages,
        1,
        "only the small message was appended"
    );
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HugeMsg(Vec<u8>);

struct HugeSink;

impl soma_supervision::DurableActor for HugeSink {
    type Msg = HugeMsg;
    type State = u64;

    fn init(&self, _key: &str) -> u64 {
        0
    }

    async fn handle(
        &self,
        _ctx: &mut soma_supervision::Context<HugeMsg>,
        n: &mut u64,
        _msg: HugeMsg,
    ) -> Result<(), soma_supervision::HandlerError> {
        *n += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivation_churn_never_runs_two_instances_of_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let mut opts = options("counter");
    opts.passivate_after_ms = Some(2);
    let reg = rt.registry(counter, opts).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{}", task % 2);
            let mut last = 0;
            for i in 0..60u64 {
                if i % 3 == 0 {
                    reg.activate(&key).await.unwrap();
                } else {
                    last = last.max(reg.send(&key, &Msg::Add(task * 1000 + i)).await.unwrap());
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..4))).await;
            }
            (key, last)
        }));
    }
    let mut lasts = std::collections::BTreeMap::new();
    for t in tasks {
        let (key, last) = t.await.unwrap();
        let e = lasts.entry(key).or_insert(0);
        *e = (*e).max(last);
    }
    for (key, last) in &lasts {
        reg.wait_handled(key, *last).await.unwrap();
        let ids = reg.state(key).await.unwrap().ids;
        let mut dedup = ids.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), ids.len(), "{key}: a message applied twice");
        assert_eq!(
            ids.len() as u64,
            *last,
            "{key}: every accepted message applied"
        );
    }
    // Per key, activations and stops alternate: never two instances at once.
    reg.stop().await;
    let mut live: std::collections::HashMap<String, i32> = Default::default();
    while let Ok(e) = events.try_recv() {
        match e {
            Event::Activated(k, _) => {
                let n = live.entry(k.clone()).or_default();
                *n += 1;
                assert_eq!(*n, 1, "{k}: a second instance started while one was live");
            }
            Event::Stopped(k) => *live.entry(k).or_default() -= 1,
            Event::ActivationFailed(k) => panic!("{k}: unexpected activation failure"),
        }
    }
}

#[tokio::test]
async fn timers_of_a_registry_not_started_do_not_starve_others() {
    use soma_supervision::{Append, Bytes, Commit, NewTimer};
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let journal = rt.journal().clone();
    // 600 due timers for a registry that never starts, written before ours.
    let key: std::sync::Arc<str> = std::sync::Arc::from("absent\u{1f}k");
    let range = journal.range_of(&key);
    let epoch = rt
        .owned()
        .into_iter()
        .find(|(r, _)| *r == range)
        .map(|(_, e)| e)
        .unwrap();
    journal
        .append(&[Append {
            key: key.clone(),
            payload: Bytes::from_static(b"x"),
            epoch,
        }])
        .await
        .unwrap();
    journal
        .commit(Commit {
            key,
            from: 1,
            seq: 1,
            state: vec![],
            timers: (0..600)
                .map(|_| NewTimer {
                    fire_at_ms: 1,
                    payload: vec![0],
                })
                .collect(),
            epoch,
        })
        .await
        .unwrap();
    let reg = rt
        .registry(Counter::new(), options("counter"))
        .await
        .unwrap();
    let seq = reg
        .send("k", &Msg::Later { id: 5, after_ms: 1 })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), reg.wait_handled("k", seq + 1))
        .await
        .expect("the timer was starved")
        .unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![5]);
}

#[tokio::test]
async fn a_reactivated_key_does_not_count_its_history_as_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let mut opts = options("counter");
    opts.max_in_flight = 3;
    opts.when_full = WhenFull::Reject;
    opts.passivate_after_ms = Some(20);
    let reg = rt.registry(counter, opts).await.unwrap();
    for id in 1..=10 {
        let seq = reg.send("k", &Msg::Add(id)).await.unwrap();
        reg.wait_handled("k", seq).await.unwrap();
    }
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    assert_eq!(next_event(&mut events).await, Event::Stopped("k".into()));
    // The key was dropped from memory; ten messages of history must not fill its mailbox.
    let (a, b) = tokio::join!(reg.send("k", &Msg::Add(11)), reg.send("k", &Msg::Add(12)));
    let last = a.unwrap().max(b.unwrap());
    reg.wait_handled("k", last).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().count, 12);
}

/// The byte budget: a message that does not fit waits (on a current-thread runtime, where a
/// sender that spun instead of waiting would starve the actor for good) and goes in once the
/// actor made room.
#[tokio::test]
async fn a_message_over_the_byte_budget_waits_for_room() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let mut opts = options("counter");
    opts.max_in_flight_bytes = 4;
    opts.when_full = WhenFull::Wait;
    let counter = Counter::new();
    let reg = rt.registry(counter.clone(), opts).await.unwrap();
    // One message always fits an empty mailbox; the gate holds it in flight.
    reg.send("k", &Msg::Gated(1)).await.unwrap();
    let big = reg.clone();
    let waiting = tokio::spawn(async move {
        // Its payload alone is over the budget once anything is in flight.
        big.send(
            "k",
            &Msg::FailThenAdd {
                id: u64::MAX - 1,
                fail_times: 0,
            },
        )
        .await
    });
    // Let it try while only the first message is in flight (a spinning sender would never
    // give the thread back from here).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished());
    let small = reg.send("k", &Msg::Add(2)).await;
    assert!(small.is_ok(), "a message that fits is not held back");
    counter.gate.add_permits(1);
    let seq = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting send never got in")
        .unwrap()
        .unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    let ids = reg.state("k").await.unwrap().ids;
    assert_eq!(ids.len(), 3, "{ids:?}");
}

/// Releasing a key's range stops its instance gracefully (the message in hand finishes and
/// commits) and leaves the rest in the journal; sends are refused as not owned; acquiring the
/// range again replays what was left, without a new message.
#[tokio::test]
async fn a_released_range_stops_its_keys_and_a_reacquired_one_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir).await;
    let (counter, mut events) = Counter::with_events();
    let reg = rt
        .registry(counter.clone(), options("counter"))
        .await
        .unwrap();
    reg.send("k", &Msg::Gated(1)).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Activated("k".into(), 0)
    );
    // The handler is blocked on the gate with message 1; 2 and 3 queue behind it.
    reg.send("k", &Msg::Add(2)).await.unwrap();
    let last = reg.send("k", &Msg::Add(3)).await.unwrap();
    let range = reg.range_of("k");
    let releasing = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.release(range).await })
    };
    // One thread: once the release task has run to its first wait, the stop is sent; only
    // then does the handler get its permit (the stop goes before the queued messages).
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(
        !releasing.is_finished(),
        "the release waits for the message in hand"
    );
    counter.gate.add_permits(1);
    releasing.await.unwrap().unwrap();
    assert_eq!(next_event(&mut events).await, Event::Stopped("k".into()));
    match reg.send("k", &Msg::Add(4)).await {
        Err(Error::NotOwned { range: r, .. }) => assert_eq!(r, range),
        other => panic!("expected NotOwned, got {other:?}"),
    }
    let handled = reg.state("k").await.unwrap().ids;
    assert_eq!(handled, vec![1], "the rest waits in the journal");
    assert!(!rt.owned().iter().any(|(r, _)| *r == range));
    rt.acquire(range).await.unwrap();
    reg.wait_handled("k", last).await.unwrap();
    assert_eq!(reg.state("k").await.unwrap().ids, vec![1, 2, 3]);
}
