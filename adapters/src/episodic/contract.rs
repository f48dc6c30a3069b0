//! The episodic-memory contract: every [`EpisodicMemory`] backend must pass [`run`].
//!
//! Each case gets a fresh, empty store from the factory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::sync::Arc;

use super::{Entry, EpisodicMemory, Scope};
use crate::error::Error;

fn entry(at_ms: u64, content: &str) -> Entry {
    Entry {
        at_ms,
        role: "user".into(),
        content: content.into(),
        metadata: serde_json::json!({ "n": at_ms }),
    }
}

fn scope(t: &str, s: &str) -> Scope {
    Scope::new(t, s).unwrap()
}

fn contents(v: &[super::Stored]) -> Vec<String> {
    v.iter().map(|s| s.entry.content.clone()).collect()
}

/// Runs every contract case against stores made by `fresh`.
pub async fn run<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn EpisodicMemory>>,
{
    Box::pin(last_returns_the_newest_oldest_first(fresh().await)).await;
    Box::pin(range_is_half_open(fresh().await)).await;
    Box::pin(tenants_and_sessions_are_isolated(fresh().await)).await;
    Box::pin(expiry_removes_only_older_entries(fresh().await)).await;
    Box::pin(erasure_removes_exactly_its_scope(fresh().await)).await;
}

pub async fn last_returns_the_newest_oldest_first(m: Arc<dyn EpisodicMemory>) {
    let s = scope("acme", "42");
    let mut ids = Vec::new();
    for i in 1..=5u64 {
        ids.push(m.append(&s, entry(i * 10, &format!("m{i}"))).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let last = m.last(&s, 3).await.unwrap();
    assert_eq!(contents(&last), vec!["m3", "m4", "m5"]);
    assert_eq!(last[2].id, ids[4]);
    assert_eq!(last[0].entry.metadata, serde_json::json!({ "n": 30 }));
    assert_eq!(m.last(&s, 100).await.unwrap().len(), 5);
    assert!(m.last(&s, 0).await.unwrap().is_empty());
}

pub async fn range_is_half_open(m: Arc<dyn EpisodicMemory>) {
    let s = scope("acme", "42");
    for i in 1..=5u64 {
        m.append(&s, entry(i * 10, &format!("m{i}"))).await.unwrap();
    }
    assert_eq!(
        contents(&m.range(&s, 20, 40).await.unwrap()),
        vec!["m2", "m3"]
    );
    assert_eq!(contents(&m.range(&s, 0, 11).await.unwrap()), vec!["m1"]);
    assert!(m.range(&s, 40, 40).await.unwrap().is_empty());
    assert!(m.range(&s, 50, 10).await.unwrap().is_empty());
}

pub async fn tenants_and_sessions_are_isolated(m: Arc<dyn EpisodicMemory>) {
    m.append(&scope("acme", "1"), entry(1, "acme-1"))
        .await
        .unwrap();
    m.append(&scope("acme", "2"), entry(1, "acme-2"))
        .await
        .unwrap();
    m.append(&scope("acme2", "1"), entry(1, "acme2-1"))
        .await
        .unwrap();
    m.append(&scope("ac", "me1"), entry(1, "ac-me1"))
        .await
        .unwrap();
    assert_eq!(
        contents(&m.last(&scope("acme", "1"), 10).await.unwrap()),
        vec!["acme-1"]
    );
    assert_eq!(
        contents(&m.last(&scope("acme2", "1"), 10).await.unwrap()),
        vec!["acme2-1"]
    );
    assert_eq!(
        contents(&m.last(&scope("ac", "me1"), 10).await.unwrap()),
        vec!["ac-me1"]
    );
    assert!(m.last(&scope("other", "1"), 10).await.unwrap().is_empty());
    assert!(matches!(
        Scope::new("", "1"),
        Err(Error::Invalid { what: "tenant", .. })
    ));
    assert!(matches!(
        Scope::new("t", "a\nb"),
        Err(Error::Invalid {
            what: "session",
            ..
        })
    ));
}

pub async fn expiry_removes_only_older_entries(m: Arc<dyn EpisodicMemory>) {
    let a = scope("acme", "1");
    let b = scope("beta", "1");
    for at in [10, 20, 30] {
        m.append(&a, entry(at, &format!("a{at}"))).await.unwrap();
        m.append(&b, entry(at, &format!("b{at}"))).await.unwrap();
    }
    assert_eq!(m.expire_before(25).await.unwrap(), 4);
    assert_eq!(contents(&m.last(&a, 10).await.unwrap()), vec!["a30"]);
    assert_eq!(contents(&m.last(&b, 10).await.unwrap()), vec!["b30"]);
    assert_eq!(m.expire_before(25).await.unwrap(), 0);
}

pub async fn erasure_removes_exactly_its_scope(m: Arc<dyn EpisodicMemory>) {
    for (t, s) in [("acme", "1"), ("acme", "2"), ("acme2", "1")] {
        for at in [1, 2] {
            m.append(&scope(t, s), entry(at, &format!("{t}-{s}-{at}")))
                .await
                .unwrap();
        }
    }
    assert_eq!(m.erase_session(&scope("acme", "1")).await.unwrap(), 2);
    assert!(m.last(&scope("acme", "1"), 10).await.unwrap().is_empty());
    assert_eq!(m.last(&scope("acme", "2"), 10).await.unwrap().len(), 2);
    assert_eq!(m.erase_tenant("acme").await.unwrap(), 2);
    assert!(m.last(&scope("acme", "2"), 10).await.unwrap().is_empty());
    assert_eq!(
        m.last(&scope("acme2", "1"), 10).await.unwrap().len(),
        2,
        "a tenant whose name extends another's is untouched"
    );
    // Erased entries are gone from the expiry index too.
    assert_eq!(m.expire_before(u64::MAX).await.unwrap(), 2);
    assert!(matches!(
        m.erase_tenant("").await,
        Err(Error::Invalid { what: "tenant", .. })
    ));
}
