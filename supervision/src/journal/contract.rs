//! The journal contract: every [`Journal`] backend must pass [`run`].
//!
//! Each case gets a fresh, empty journal from the factory; the crash cases also get the
//! backend's crash-and-reopen hook, which must end the journal as a crash would (nothing
//! flushed or closed on the way out) and open it again. Nothing here assumes a key layout:
//! keys are opaque strings, prefixes are prefixes of those strings.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use super::{Append, Bytes, Commit, Epoch, Journal, KeyRange, NewTimer};
use crate::error::{Error, Fence};

/// The epochs a test writer holds, per range.
#[derive(Debug, Default, Clone)]
pub struct Held(HashMap<KeyRange, Epoch>);

impl Held {
    pub fn of(&self, j: &dyn Journal, key: &str) -> Epoch {
        *self
            .0
            .get(&j.range_of(key))
            .unwrap_or_else(|| panic!("range of {key} not held"))
    }
}

/// Acquires the ranges of `keys`.
pub async fn hold(j: &dyn Journal, keys: &[&str]) -> Held {
    let mut held = Held::default();
    for k in keys {
        let r = j.range_of(k);
        if let std::collections::hash_map::Entry::Vacant(e) = held.0.entry(r) {
            e.insert(j.acquire(r).await.unwrap());
        }
    }
    held
}

pub fn app(j: &dyn Journal, held: &Held, key: &str, payload: &[u8]) -> Append {
    Append {
        key: Arc::from(key),
        payload: Bytes::copy_from_slice(payload),
        epoch: held.of(j, key),
    }
}

pub fn commit(j: &dyn Journal, held: &Held, key: &str, seq: u64, state: &[u8]) -> Commit {
    Commit {
        key: Arc::from(key),
        from: seq,
        seq,
        state: state.to_vec(),
        timers: Vec::new(),
        epoch: held.of(j, key),
    }
}

/// Runs every contract case against journals made by `fresh`; `crash` ends a journal as a
/// crash would and returns it opened again.
pub async fn run<F, Fut, C, CFut>(fresh: F, crash: C)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Journal>>,
    C: Fn(Arc<dyn Journal>) -> CFut,
    CFut: Future<Output = Arc<dyn Journal>>,
{
    Box::pin(append_assigns_gapless_sequences_per_key(fresh().await)).await;
    Box::pin(pending_reads_in_order_from_a_sequence(fresh().await)).await;
    Box::pin(commit_acknowledges_and_stores_state(fresh().await)).await;
    Box::pin(failures_are_counted_until_commit(fresh().await)).await;
    Box::pin(commit_of_a_range_acknowledges_all_of_it(fresh().await)).await;
    Box::pin(a_commit_that_does_not_continue_applied_is_refused(
        fresh().await,
    ))
    .await;
    Box::pin(only_the_current_owner_of_a_range_writes(fresh().await)).await;
    Box::pin(a_released_range_refuses_its_old_epoch(fresh().await)).await;
    Box::pin(dead_letter_moves_message_aside(fresh().await)).await;
    Box::pin(redrive_appends_dead_letter_as_new_message(fresh().await)).await;
    Box::pin(timers_fire_once_into_the_inbox(fresh().await)).await;
    Box::pin(keys_with_pending_lists_each_key_once(fresh().await)).await;
    Box::pin(keys_that_share_a_prefix_stay_apart(fresh().await)).await;
    Box::pin(keys_with_state_lists_committed_keys(fresh().await, &crash)).await;
    Box::pin(a_discarded_dead_letter_is_gone(fresh().await)).await;
    Box::pin(discarded_timers_never_fire(fresh().await)).await;
    Box::pin(oversized_messages_are_refused(fresh().await)).await;
    Box::pin(appends_and_commits_survive_a_crash(fresh().await, &crash)).await;
    Box::pin(epochs_keep_growing_across_a_crash(fresh().await, &crash)).await;
}

pub async fn append_assigns_gapless_sequences_per_key(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["a", "b"]).await;
    let seqs = j
        .append(&[
            app(&*j, &h, "a", b"1"),
            app(&*j, &h, "b", b"1"),
            app(&*j, &h, "a", b"2"),
            app(&*j, &h, "a", b"3"),
        ])
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 1, 2, 3]);
    let seqs = j.append(&[app(&*j, &h, "b", b"2")]).await.unwrap();
    assert_eq!(seqs, vec![2]);
    assert_eq!(j.append(&[]).await.unwrap(), Vec::<u64>::new());
}

pub async fn pending_reads_in_order_from_a_sequence(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let batch: Vec<Append> = (0..10u8).map(|i| app(&*j, &h, "k", &[i])).collect();
    j.append(&batch).await.unwrap();
    let all = j.pending("k", 1, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(&*all[3].payload, &[3u8]);
    let some = j.pending("k", 4, 3).await.unwrap();
    assert_eq!(
        some.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    assert!(j.pending("other", 1, 10).await.unwrap().is_empty());
}

pub async fn commit_acknowledges_and_stores_state(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    assert_eq!(j.load("k").await.unwrap().applied, 0);
    assert_eq!(j.load("k").await.unwrap().state, None);
    j.append(&[app(&*j, &h, "k", b"x"), app(&*j, &h, "k", b"y")])
        .await
        .unwrap();
    j.commit(commit(&*j, &h, "k", 1, b"state-1")).await.unwrap();
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 1);
    assert_eq!(snap.state.as_deref(), Some(&b"state-1"[..]));
    let rest = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    j.commit(commit(&*j, &h, "k", 2, b"state-2")).await.unwrap();
    assert!(j.pending("k", 1, 10).await.unwrap().is_empty());
    // Sequence numbers continue after everything was acknowledged.
    assert_eq!(j.append(&[app(&*j, &h, "k", b"z")]).await.unwrap(), vec![3]);
}

pub async fn failures_are_counted_until_commit(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    j.append(&[app(&*j, &h, "k", b"x")]).await.unwrap();
    assert_eq!(j.record_failure("k", 1).await.unwrap(), 1);
    assert_eq!(j.record_failure("k", 1).await.unwrap(), 2);
    assert_eq!(
        j.record_failure("other", 1).await.unwrap(),
        1,
        "counts are per key"
    );
    j.commit(commit(&*j, &h, "k", 1, b"s")).await.unwrap();
    j.append(&[app(&*j, &h, "k", b"y")]).await.unwrap();
    assert_eq!(j.record_failure("k", 2).await.unwrap(), 1);
}

pub async fn commit_of_a_range_acknowledges_all_of_it(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let batch: Vec<Append> = (0..6u8).map(|i| app(&*j, &h, "k", &[i])).collect();
    j.append(&batch).await.unwrap();
    let mut c = commit(&*j, &h, "k", 4, b"after-4");
    c.from = 1;
    j.commit(c).await.unwrap();
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 4);
    assert_eq!(snap.state.as_deref(), Some(&b"after-4"[..]));
    let rest = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
}

/// The compare-and-set: a late commit (of an instance that was killed and replaced) can
/// never move `applied` back or overwrite its successor's state, with or without timers.
pub async fn a_commit_that_does_not_continue_applied_is_refused(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let batch: Vec<Append> = (0..3u8).map(|i| app(&*j, &h, "k", &[i])).collect();
    j.append(&batch).await.unwrap();
    let mut successor = commit(&*j, &h, "k", 2, b"successor");
    successor.from = 1;
    j.commit(successor).await.unwrap();
    // The killed instance handled seq 1 alone and commits late.
    let late = j.commit(commit(&*j, &h, "k", 1, b"stale")).await;
    assert!(
        matches!(
            late,
            Err(Error::Fenced {
                reason: Fence::NotNext {
                    from: 1,
                    applied: 2
                },
                ..
            })
        ),
        "{late:?}"
    );
    let mut late_with_timer = commit(&*j, &h, "k", 1, b"stale");
    late_with_timer.timers = vec![NewTimer {
        fire_at_ms: 1,
        payload: b"twice".to_vec(),
    }];
    assert!(matches!(
        j.commit(late_with_timer).await,
        Err(Error::Fenced { .. })
    ));
    // Skipping ahead is refused too.
    assert!(matches!(
        j.commit(commit(&*j, &h, "k", 4, b"ahead")).await,
        Err(Error::Fenced { .. })
    ));
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 2);
    assert_eq!(snap.state.as_deref(), Some(&b"successor"[..]));
    assert_eq!(j.next_timer(j.range_of("k")).await.unwrap(), None);
    assert_eq!(j.pending("k", 1, 10).await.unwrap().len(), 1);
}

/// Two writers on one key: after the second acquires the range, only its effects land.
pub async fn only_the_current_owner_of_a_range_writes(j: Arc<dyn Journal>) {
    let old = hold(&*j, &["k"]).await;
    j.append(&[app(&*j, &old, "k", b"old-1")]).await.unwrap();
    let new = hold(&*j, &["k"]).await;
    assert!(
        new.of(&*j, "k") > old.of(&*j, "k"),
        "acquiring bumps the epoch"
    );
    // The old owner's append, commit, dead letter and re-drive are all refused.
    let stale = |r: Result<_, Error>| {
        matches!(
            r,
            Err(Error::Fenced {
                reason: Fence::StaleEpoch { .. },
                ..
            })
        )
    };
    assert!(stale(
        j.append(&[app(&*j, &old, "k", b"old-2")]).await.map(|_| ())
    ));
    assert!(stale(j.commit(commit(&*j, &old, "k", 1, b"old")).await));
    assert!(stale(
        j.dead_letter("k", 1, "old", 1, old.of(&*j, "k")).await
    ));
    assert!(stale(j.redrive("k", 1, old.of(&*j, "k")).await.map(|_| ())));
    // The new owner continues the key where it was.
    assert_eq!(
        j.append(&[app(&*j, &new, "k", b"new-2")]).await.unwrap(),
        vec![2]
    );
    j.commit(commit(&*j, &new, "k", 1, b"new")).await.unwrap();
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 1);
    assert_eq!(snap.state.as_deref(), Some(&b"new"[..]));
    let pending = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        &*pending[0].payload, b"new-2",
        "nothing of the old owner landed"
    );
}

pub async fn a_released_range_refuses_its_old_epoch(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    j.append(&[app(&*j, &h, "k", b"1")]).await.unwrap();
    let r = j.range_of("k");
    j.release(r, h.of(&*j, "k")).await.unwrap();
    assert!(matches!(
        j.append(&[app(&*j, &h, "k", b"2")]).await,
        Err(Error::Fenced { .. })
    ));
    // What was appended stays, readable by the next owner.
    let again = hold(&*j, &["k"]).await;
    assert_eq!(j.pending("k", 1, 10).await.unwrap().len(), 1);
    assert_eq!(
        j.keys_with_pending(r, "").await.unwrap(),
        vec!["k".to_string()]
    );
    assert_eq!(
        j.append(&[app(&*j, &again, "k", b"2")]).await.unwrap(),
        vec![2]
    );
}

pub async fn dead_letter_moves_message_aside(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let e = h.of(&*j, "k");
    j.append(&[
        app(&*j, &h, "k", b"ok"),
        app(&*j, &h, "k", b"poison"),
        app(&*j, &h, "k", b"next"),
    ])
    .await
    .unwrap();
    j.commit(commit(&*j, &h, "k", 1, b"after-1")).await.unwrap();
    assert!(
        matches!(
            j.dead_letter("k", 3, "not next", 1, e).await,
            Err(Error::Fenced { .. })
        ),
        "only the message after applied can be dead-lettered"
    );
    j.dead_letter("k", 2, "boom", 3, e).await.unwrap();
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 2, "a dead letter is acknowledged");
    assert_eq!(
        snap.state.as_deref(),
        Some(&b"after-1"[..]),
        "state is unchanged"
    );
    let rest = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    let dead = j.dead_letters("k").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].seq, 2);
    assert_eq!(dead[0].payload, b"poison".to_vec());
    assert_eq!(dead[0].error, "boom");
    assert_eq!(dead[0].attempts, 3);
    assert!(j.dead_letters("other").await.unwrap().is_empty());
}

pub async fn redrive_appends_dead_letter_as_new_message(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let e = h.of(&*j, "k");
    j.append(&[app(&*j, &h, "k", b"poison")]).await.unwrap();
    j.dead_letter("k", 1, "boom", 1, e).await.unwrap();
    let seq = j.redrive("k", 1, e).await.unwrap();
    assert_eq!(seq, 2);
    assert!(j.dead_letters("k").await.unwrap().is_empty());
    let pending = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].seq, 2);
    assert_eq!(&*pending[0].payload, b"poison");
    match j.redrive("k", 1, e).await {
        Err(Error::NoSuchDeadLetter { seq: 1, .. }) => {}
        other => panic!("expected NoSuchDeadLetter, got {other:?}"),
    }
}

pub async fn timers_fire_once_into_the_inbox(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let e = h.of(&*j, "k");
    let r = j.range_of("k");
    assert_eq!(j.next_timer(r).await.unwrap(), None);
    j.append(&[app(&*j, &h, "k", b"m")]).await.unwrap();
    let mut c = commit(&*j, &h, "k", 1, b"s");
    c.timers = vec![
        NewTimer {
            fire_at_ms: 2_000,
            payload: b"late".to_vec(),
        },
        NewTimer {
            fire_at_ms: 1_000,
            payload: b"early".to_vec(),
        },
    ];
    j.commit(c).await.unwrap();
    assert_eq!(j.next_timer(r).await.unwrap(), Some(1_000));
    assert!(j.due_timers(r, 999, 10).await.unwrap().is_empty());
    let due = j.due_timers(r, 1_500, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].payload, b"early".to_vec());
    assert_eq!(&*due[0].key, "k");
    assert_eq!(j.fire_timer(&due[0], e).await.unwrap(), Some(2));
    assert_eq!(
        j.fire_timer(&due[0], e).await.unwrap(),
        None,
        "a timer fires once"
    );
    let pending = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(&*pending[0].payload, b"early");
    assert_eq!(j.next_timer(r).await.unwrap(), Some(2_000));
    let due = j.due_timers(r, 5_000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(j.fire_timer(&due[0], e).await.unwrap(), Some(3));
    assert_eq!(j.next_timer(r).await.unwrap(), None);
}

pub async fn keys_with_pending_lists_each_key_once(j: Arc<dyn Journal>) {
    let keys = ["reg/a", "reg/b", "other/c"];
    let h = hold(&*j, &keys).await;
    j.append(&[
        app(&*j, &h, "reg/a", b"1"),
        app(&*j, &h, "reg/a", b"2"),
        app(&*j, &h, "reg/b", b"1"),
        app(&*j, &h, "other/c", b"1"),
    ])
    .await
    .unwrap();
    j.commit(commit(&*j, &h, "reg/b", 1, b"s")).await.unwrap();
    let mut in_reg = Vec::new();
    let mut all = Vec::new();
    for r in 0..j.ranges() {
        in_reg.extend(j.keys_with_pending(KeyRange(r), "reg/").await.unwrap());
        all.extend(j.keys_with_pending(KeyRange(r), "").await.unwrap());
    }
    assert_eq!(in_reg, vec!["reg/a".to_string()]);
    all.sort();
    assert_eq!(all, vec!["other/c".to_string(), "reg/a".to_string()]);
    // A range lists only its own keys.
    let ra = j.range_of("reg/a");
    for k in j.keys_with_pending(ra, "").await.unwrap() {
        assert_eq!(j.range_of(&k), ra);
    }
}

pub async fn keys_that_share_a_prefix_stay_apart(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["a", "ab", "abc"]).await;
    j.append(&[
        app(&*j, &h, "ab", b"1"),
        app(&*j, &h, "a", b"1"),
        app(&*j, &h, "abc", b"1"),
    ])
    .await
    .unwrap();
    assert_eq!(j.pending("a", 1, 10).await.unwrap().len(), 1);
    assert_eq!(j.pending("ab", 1, 10).await.unwrap().len(), 1);
    j.commit(commit(&*j, &h, "a", 1, b"sa")).await.unwrap();
    assert_eq!(j.load("ab").await.unwrap().applied, 0);
    assert_eq!(j.load("a").await.unwrap().applied, 1);
    j.dead_letter("ab", 1, "e", 1, h.of(&*j, "ab"))
        .await
        .unwrap();
    // Prefixes are prefixes of the key string, nothing more.
    let keys = |v: Vec<super::DeadLetter>| v.into_iter().map(|l| l.key).collect::<Vec<_>>();
    assert_eq!(keys(j.dead_letters("ab").await.unwrap()), vec!["ab"]);
    assert_eq!(keys(j.dead_letters("a").await.unwrap()), vec!["ab"]);
    assert!(j.dead_letters("abc").await.unwrap().is_empty());
    assert!(j.dead_letters("b").await.unwrap().is_empty());
}

pub async fn keys_with_state_lists_committed_keys<C, CFut>(j: Arc<dyn Journal>, crash: &C)
where
    C: Fn(Arc<dyn Journal>) -> CFut,
    CFut: Future<Output = Arc<dyn Journal>>,
{
    let keys = ["reg/a", "reg/ab", "reg/b", "other/a"];
    let h = hold(&*j, &keys).await;
    let batch: Vec<Append> = keys.iter().map(|k| app(&*j, &h, k, b"1")).collect();
    j.append(&batch).await.unwrap();
    let listed = |j: Arc<dyn Journal>, prefix: &'static str| async move {
        let mut out = Vec::new();
        for r in 0..j.ranges() {
            let in_range = j.keys_with_state(&[KeyRange(r)], prefix).await.unwrap();
            for k in &in_range {
                assert_eq!(j.range_of(k), KeyRange(r), "{k} listed in another range");
            }
            out.extend(in_range);
        }
        out.sort();
        out
    };
    assert!(
        listed(j.clone(), "").await.is_empty(),
        "pending is not committed"
    );
    for k in ["reg/a", "reg/ab", "other/a"] {
        j.commit(commit(&*j, &h, k, 1, b"")).await.unwrap();
    }
    assert_eq!(listed(j.clone(), "reg/a").await, vec!["reg/a", "reg/ab"]);
    assert_eq!(listed(j.clone(), "reg/").await, vec!["reg/a", "reg/ab"]);
    assert_eq!(listed(j.clone(), "").await.len(), 3);
    j.flush().await.unwrap();
    let j = crash(j).await;
    assert_eq!(
        listed(j.clone(), "reg/").await,
        vec!["reg/a", "reg/ab"],
        "after a crash"
    );
}

pub async fn a_discarded_dead_letter_is_gone(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k", "k2"]).await;
    let e = h.of(&*j, "k");
    j.append(&[app(&*j, &h, "k", b"poison"), app(&*j, &h, "k2", b"poison")])
        .await
        .unwrap();
    j.dead_letter("k", 1, "boom", 1, e).await.unwrap();
    j.dead_letter("k2", 1, "boom", 1, h.of(&*j, "k2"))
        .await
        .unwrap();
    j.discard_dead_letter("k", 1, e).await.unwrap();
    let left: Vec<String> = j
        .dead_letters("k")
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(left, vec!["k2"], "only k's letter is gone");
    assert_eq!(j.load("k").await.unwrap().applied, 1, "still acknowledged");
    match j.discard_dead_letter("k", 1, e).await {
        Err(Error::NoSuchDeadLetter { seq: 1, .. }) => {}
        other => panic!("expected NoSuchDeadLetter, got {other:?}"),
    }
    let stale = h.of(&*j, "k2");
    let newer = hold(&*j, &["k2"]).await;
    assert!(
        matches!(
            j.discard_dead_letter("k2", 1, stale).await,
            Err(Error::Fenced { .. })
        ),
        "a stale epoch discards nothing"
    );
    assert_eq!(j.dead_letters("k2").await.unwrap().len(), 1);
    j.discard_dead_letter("k2", 1, newer.of(&*j, "k2"))
        .await
        .unwrap();
    assert!(j.dead_letters("k").await.unwrap().is_empty());
}

pub async fn discarded_timers_never_fire(j: Arc<dyn Journal>) {
    // "k" and "k0" share a prefix; only "k"'s timers go.
    let keys = ["k", "k0"];
    let h = hold(&*j, &keys).await;
    for k in keys {
        j.append(&[app(&*j, &h, k, b"m")]).await.unwrap();
        let mut c = commit(&*j, &h, k, 1, b"s");
        c.timers = [1_000, 2_000]
            .into_iter()
            .map(|at| NewTimer {
                fire_at_ms: at,
                payload: k.as_bytes().to_vec(),
            })
            .collect();
        j.commit(c).await.unwrap();
    }
    assert_eq!(j.discard_timers("k", h.of(&*j, "k")).await.unwrap(), 2);
    assert_eq!(j.discard_timers("k", h.of(&*j, "k")).await.unwrap(), 0);
    let mut ranges: Vec<KeyRange> = keys.iter().map(|k| j.range_of(k)).collect();
    ranges.dedup();
    let mut due = Vec::new();
    for r in ranges {
        due.extend(j.due_timers(r, 5_000, 10).await.unwrap());
    }
    assert_eq!(due.len(), 2, "{due:?}");
    assert!(due.iter().all(|t| &*t.key == "k0"), "{due:?}");
    let stale = h.of(&*j, "k0");
    let _newer = hold(&*j, &["k0"]).await;
    assert!(matches!(
        j.discard_timers("k0", stale).await,
        Err(Error::Fenced { .. })
    ));
}

pub async fn oversized_messages_are_refused(j: Arc<dyn Journal>) {
    let h = hold(&*j, &["k"]).await;
    let huge = vec![0u8; crate::codec::MAX_MESSAGE_BYTES + 1];
    let r = j.append(&[app(&*j, &h, "k", &huge)]).await;
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");
    assert!(
        j.pending("k", 1, 10).await.unwrap().is_empty(),
        "nothing written"
    );
    assert_eq!(
        j.append(&[app(&*j, &h, "k", b"ok")]).await.unwrap(),
        vec![1]
    );
}

/// What was acknowledged as appended survives a crash; a commit may be lost (then its
/// messages are pending again) but is never half there.
pub async fn appends_and_commits_survive_a_crash<C, CFut>(j: Arc<dyn Journal>, crash: &C)
where
    C: Fn(Arc<dyn Journal>) -> CFut,
    CFut: Future<Output = Arc<dyn Journal>>,
{
    let h = hold(&*j, &["k", "f"]).await;
    let batch: Vec<Append> = (0..5u8).map(|i| app(&*j, &h, "k", &[i])).collect();
    j.append(&batch).await.unwrap();
    j.append(&[app(&*j, &h, "f", b"flushed")]).await.unwrap();
    j.commit(commit(&*j, &h, "f", 1, b"f-1")).await.unwrap();
    j.flush().await.unwrap();
    let mut c = commit(&*j, &h, "k", 2, b"k-2");
    c.from = 1;
    j.commit(c).await.unwrap();
    let j = crash(j).await;
    assert!(j.recovered_from_crash(), "a crash is reported as such");
    let k = j.load("k").await.unwrap();
    match k.applied {
        0 => assert_eq!(k.state, None),
        2 => assert_eq!(k.state.as_deref(), Some(&b"k-2"[..])),
        other => panic!("a commit came back half: applied {other}"),
    }
    let pending: Vec<u64> = j
        .pending("k", 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        pending,
        ((k.applied + 1)..=5).collect::<Vec<_>>(),
        "applied {} (pending keys {:?})",
        k.applied,
        j.keys_with_pending(j.range_of("k"), "").await
    );
    let f = j.load("f").await.unwrap();
    assert_eq!(f.applied, 1, "a flushed commit survives");
    let h = hold(&*j, &["k"]).await;
    assert_eq!(
        j.append(&[app(&*j, &h, "k", b"6")]).await.unwrap(),
        vec![6],
        "sequences continue after a crash"
    );
}

pub async fn epochs_keep_growing_across_a_crash<C, CFut>(j: Arc<dyn Journal>, crash: &C)
where
    C: Fn(Arc<dyn Journal>) -> CFut,
    CFut: Future<Output = Arc<dyn Journal>>,
{
    let before = hold(&*j, &["k"]).await.of(&*j, "k");
    let j = crash(j).await;
    let after = hold(&*j, &["k"]).await.of(&*j, "k");
    assert!(
        after > before,
        "epoch {after} after a crash, {before} before"
    );
}
