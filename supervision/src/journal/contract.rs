//! The journal contract: every [`Journal`] backend must pass [`run`].
//!
//! Each case gets a fresh, empty journal from the factory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::sync::Arc;

use super::{Append, Bytes, Commit, Journal, NewTimer};
use crate::error::Error;

fn app(key: &str, payload: &[u8]) -> Append {
    Append {
        key: Arc::from(key),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn commit(key: &str, seq: u64, state: &[u8]) -> Commit {
    Commit {
        key: Arc::from(key),
        from: seq,
        seq,
        state: state.to_vec(),
        timers: Vec::new(),
    }
}

/// Runs every contract case against journals made by `fresh`.
pub async fn run<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Journal>>,
{
    Box::pin(append_assigns_gapless_sequences_per_key(fresh().await)).await;
    Box::pin(pending_reads_in_order_from_a_sequence(fresh().await)).await;
    Box::pin(commit_acknowledges_and_stores_state(fresh().await)).await;
    Box::pin(failures_are_counted_until_commit(fresh().await)).await;
    Box::pin(commit_of_a_range_acknowledges_all_of_it(fresh().await)).await;
    Box::pin(dead_letter_moves_message_aside(fresh().await)).await;
    Box::pin(redrive_appends_dead_letter_as_new_message(fresh().await)).await;
    Box::pin(timers_fire_once_into_the_inbox(fresh().await)).await;
    Box::pin(keys_with_pending_lists_each_key_once(fresh().await)).await;
    Box::pin(keys_that_share_a_prefix_stay_apart(fresh().await)).await;
}

pub async fn append_assigns_gapless_sequences_per_key(j: Arc<dyn Journal>) {
    let seqs = j
        .append(&[
            app("a", b"1"),
            app("b", b"1"),
            app("a", b"2"),
            app("a", b"3"),
        ])
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 1, 2, 3]);
    let seqs = j.append(&[app("b", b"2")]).await.unwrap();
    assert_eq!(seqs, vec![2]);
    assert_eq!(j.append(&[]).await.unwrap(), Vec::<u64>::new());
}

pub async fn pending_reads_in_order_from_a_sequence(j: Arc<dyn Journal>) {
    let batch: Vec<Append> = (0..10u8).map(|i| app("k", &[i])).collect();
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
    assert_eq!(j.load("k").await.unwrap().applied, 0);
    assert_eq!(j.load("k").await.unwrap().state, None);
    j.append(&[app("k", b"x"), app("k", b"y")]).await.unwrap();
    j.commit(commit("k", 1, b"state-1")).await.unwrap();
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 1);
    assert_eq!(snap.state.as_deref(), Some(&b"state-1"[..]));
    let rest = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    j.commit(commit("k", 2, b"state-2")).await.unwrap();
    assert!(j.pending("k", 1, 10).await.unwrap().is_empty());
    // Sequence numbers continue after everything was acknowledged.
    assert_eq!(j.append(&[app("k", b"z")]).await.unwrap(), vec![3]);
}

pub async fn failures_are_counted_until_commit(j: Arc<dyn Journal>) {
    j.append(&[app("k", b"x")]).await.unwrap();
    assert_eq!(j.record_failure("k", 1).await.unwrap(), 1);
    assert_eq!(j.record_failure("k", 1).await.unwrap(), 2);
    assert_eq!(
        j.record_failure("other", 1).await.unwrap(),
        1,
        "counts are per key"
    );
    j.commit(commit("k", 1, b"s")).await.unwrap();
    j.append(&[app("k", b"y")]).await.unwrap();
    assert_eq!(j.record_failure("k", 2).await.unwrap(), 1);
}

pub async fn commit_of_a_range_acknowledges_all_of_it(j: Arc<dyn Journal>) {
    let batch: Vec<Append> = (0..6u8).map(|i| app("k", &[i])).collect();
    j.append(&batch).await.unwrap();
    let mut c = commit("k", 4, b"after-4");
    c.from = 1;
    j.commit(c).await.unwrap();
    let snap = j.load("k").await.unwrap();
    assert_eq!(snap.applied, 4);
    assert_eq!(snap.state.as_deref(), Some(&b"after-4"[..]));
    let rest = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
}

pub async fn dead_letter_moves_message_aside(j: Arc<dyn Journal>) {
    j.append(&[app("k", b"ok"), app("k", b"poison"), app("k", b"next")])
        .await
        .unwrap();
    j.commit(commit("k", 1, b"after-1")).await.unwrap();
    j.dead_letter("k", 2, "boom", 3).await.unwrap();
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
    j.append(&[app("k", b"poison")]).await.unwrap();
    j.dead_letter("k", 1, "boom", 1).await.unwrap();
    let seq = j.redrive("k", 1).await.unwrap();
    assert_eq!(seq, 2);
    assert!(j.dead_letters("k").await.unwrap().is_empty());
    let pending = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].seq, 2);
    assert_eq!(&*pending[0].payload, b"poison");
    match j.redrive("k", 1).await {
        Err(Error::NoSuchDeadLetter { seq: 1, .. }) => {}
        other => panic!("expected NoSuchDeadLetter, got {other:?}"),
    }
}

pub async fn timers_fire_once_into_the_inbox(j: Arc<dyn Journal>) {
    assert_eq!(j.next_timer().await.unwrap(), None);
    j.append(&[app("k", b"m")]).await.unwrap();
    let mut c = commit("k", 1, b"s");
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
    assert_eq!(j.next_timer().await.unwrap(), Some(1_000));
    assert!(j.due_timers(999, 10).await.unwrap().is_empty());
    let due = j.due_timers(1_500, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].payload, b"early".to_vec());
    assert_eq!(&*due[0].key, "k");
    assert_eq!(j.fire_timer(&due[0]).await.unwrap(), Some(2));
    assert_eq!(
        j.fire_timer(&due[0]).await.unwrap(),
        None,
        "a timer fires once"
    );
    let pending = j.pending("k", 1, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(&*pending[0].payload, b"early");
    assert_eq!(j.next_timer().await.unwrap(), Some(2_000));
    let due = j.due_timers(5_000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(j.fire_timer(&due[0]).await.unwrap(), Some(3));
    assert_eq!(j.next_timer().await.unwrap(), None);
}

pub async fn keys_with_pending_lists_each_key_once(j: Arc<dyn Journal>) {
    j.append(&[
        app("reg\u{1f}a", b"1"),
        app("reg\u{1f}a", b"2"),
        app("reg\u{1f}b", b"1"),
        app("other\u{1f}c", b"1"),
    ])
    .await
    .unwrap();
    j.commit(commit("reg\u{1f}b", 1, b"s")).await.unwrap();
    let keys = j.keys_with_pending("reg\u{1f}").await.unwrap();
    assert_eq!(keys, vec!["reg\u{1f}a".to_string()]);
    let all = j.keys_with_pending("").await.unwrap();
    assert_eq!(all.len(), 2);
}

pub async fn keys_that_share_a_prefix_stay_apart(j: Arc<dyn Journal>) {
    j.append(&[app("ab", b"1"), app("a", b"1"), app("abc", b"1")])
        .await
        .unwrap();
    assert_eq!(j.pending("a", 1, 10).await.unwrap().len(), 1);
    assert_eq!(j.pending("ab", 1, 10).await.unwrap().len(), 1);
    j.commit(commit("a", 1, b"sa")).await.unwrap();
    assert_eq!(j.load("ab").await.unwrap().applied, 0);
    assert_eq!(j.load("a").await.unwrap().applied, 1);
    j.dead_letter("ab", 1, "e", 1).await.unwrap();
    assert!(j.dead_letters("a\0").await.unwrap().is_empty());
    assert_eq!(j.dead_letters("ab\0").await.unwrap().len(), 1);
}
