//! The contract every [`VectorMemory`] backend passes. `make` gives a fresh, empty memory of
//! dimension [`DIM`] per case.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{Condition, Filter, MatchValue, Point, VectorMemory};
use crate::error::Error;

/// The dimension of the memories the contract uses.
pub const DIM: usize = 8;

/// A unit vector along axis `i`, nudged towards axis `i + 1` by `tilt`.
pub fn axis(i: usize, tilt: f32) -> Vec<f32> {
    let mut v = vec![0.0; DIM];
    v[i % DIM] = 1.0;
    v[(i + 1) % DIM] = tilt;
    v
}

fn point(id: &str, vector: Vec<f32>, payload: Value) -> Point {
    let Value::Object(payload) = payload else {
        panic!("payload must be an object")
    };
    Point {
        id: id.into(),
        vector,
        payload,
    }
}

/// Runs every case.
pub async fn run<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn VectorMemory>>,
{
    upsert_get_replace_delete(make().await).await;
    search_ranks_by_similarity_and_filters(make().await).await;
    tenants_never_see_each_other(make().await).await;
    bad_input_is_refused_with_its_reason(make().await).await;
}

async fn upsert_get_replace_delete(m: Arc<dyn VectorMemory>) {
    assert_eq!(m.dimension(), DIM);
    let a = point("a", axis(0, 0.0), json!({"text": "alpha", "n": 1}));
    let b = point("b", axis(1, 0.0), json!({"text": "beta", "n": 2}));
    m.upsert("acme", vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(m.count("acme", None).await.unwrap(), 2);
    let got = m
        .get("acme", &["b".into(), "missing".into(), "a".into()])
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id, "b");
    assert_eq!(got[1].payload, a.payload);
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
    // Stored normalised for cosine: a unit vector comes back as it went in.
    assert!(close(&got[1].vector, &a.vector), "{:?}", got[1].vector);
    // Same id again: replaced, not added.
    let a2 = point("a", axis(2, 0.0), json!({"text": "alpha v2"}));
    m.upsert("acme", vec![a2.clone()]).await.unwrap();
    assert_eq!(m.count("acme", None).await.unwrap(), 2);
    let got = m.get("acme", &["a".into()]).await.unwrap();
    assert_eq!(got[0].payload, a2.payload);
    assert_eq!(
        m.delete("acme", &["a".into(), "nope".into()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(m.count("acme", None).await.unwrap(), 1);
    assert!(m.get("acme", &["a".into()]).await.unwrap().is_empty());
}

async fn search_ranks_by_similarity_and_filters(m: Arc<dyn VectorMemory>) {
    let points: Vec<Point> = (0..40)
        .map(|i| {
            point(
                &format!("p{i}"),
                axis(i % 4, 0.1 * (i / 4) as f32),
                json!({
                    "kind": if i % 2 == 0 { "doc" } else { "chat" },
                    "n": i,
                    "score": i as f64 / 2.0,
                    "tags": [format!("t{}", i % 3)],
                    "meta": {"source": if i < 20 { "web" } else { "mail" }},
                }),
            )
        })
        .collect();
    m.upsert("acme", points).await.unwrap();
    assert_eq!(m.count("acme", None).await.unwrap(), 40);

    // Closest first: the exact axis vector (p0, tilt 0) then the least tilted ones.
    let hits = m.search("acme", &axis(0, 0.0), 3, None).await.unwrap();
    let ids: Vec<_> = hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["p0", "p4", "p8"]);
    assert!((hits[0].score - 1.0).abs() < 1e-4, "{}", hits[0].score);
    assert!(hits[0].score >= hits[1].score && hits[1].score >= hits[2].score);
    assert_eq!(hits[0].payload["kind"], "doc");

    let chat = Filter::keyword("kind", "chat");
    let hits = m
        .search("acme", &axis(1, 0.0), 5, Some(&chat))
        .await
        .unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.payload["kind"] == "chat"));
    assert_eq!(hits[0].id, "p1");
    assert_eq!(m.count("acme", Some(&chat)).await.unwrap(), 20);

    let f = Filter::default().and(Condition::Range {
        key: "score".into(),
        min: Some(5.0),
        max: Some(9.5),
    });
    assert_eq!(m.count("acme", Some(&f)).await.unwrap(), 10); // n = 10..=19
    let f = Filter::default().and(Condition::Equals {
        key: "n".into(),
        value: MatchValue::Integer(7),
    });
    let hits = m.search("acme", &axis(0, 0.0), 10, Some(&f)).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, "p7");
    let f = Filter::keyword("meta.source", "mail").and(Condition::AnyOf {
        key: "tags".into(),
        values: vec!["t0".into(), "t1".into()],
    });
    let n = (20..40).filter(|i| i % 3 != 2).count() as u64;
    assert_eq!(m.count("acme", Some(&f)).await.unwrap(), n);
    // No match: empty, not an error.
    let none = Filter::keyword("kind", "nothing");
    assert!(
        m.search("acme", &axis(0, 0.0), 5, Some(&none))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn tenants_never_see_each_other(m: Arc<dyn VectorMemory>) {
    m.upsert(
        "acme",
        vec![point("same", axis(0, 0.0), json!({"who": "acme"}))],
    )
    .await
    .unwrap();
    m.upsert(
        "globex",
        vec![point("same", axis(0, 0.0), json!({"who": "globex"}))],
    )
    .await
    .unwrap();
    for (tenant, other) in [("acme", "globex"), ("globex", "acme")] {
        let hits = m.search(tenant, &axis(0, 0.0), 10, None).await.unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].payload["who"], tenant);
        let got = m.get(tenant, &["same".into()]).await.unwrap();
        assert_eq!(got[0].payload["who"], tenant);
        // A filter naming the other tenant's payload finds nothing here.
        let f = Filter::keyword("who", other);
        assert_eq!(m.count(tenant, Some(&f)).await.unwrap(), 0);
    }
    assert_eq!(m.count("initech", None).await.unwrap(), 0);
    assert_eq!(m.erase_tenant("acme").await.unwrap(), 1);
    assert_eq!(m.count("acme", None).await.unwrap(), 0);
    assert_eq!(m.count("globex", None).await.unwrap(), 1);
    assert_eq!(m.delete("acme", &["same".into()]).await.unwrap(), 0);
    assert_eq!(m.count("globex", None).await.unwrap(), 1);
}

async fn bad_input_is_refused_with_its_reason(m: Arc<dyn VectorMemory>) {
    let short = point("x", vec![1.0; DIM - 1], json!({}));
    let err = m.upsert("acme", vec![short]).await.unwrap_err();
    assert!(
        matches!(err, Error::Dimension { expected: DIM, found } if found == DIM - 1),
        "{err}"
    );
    let mut nan = axis(0, 0.0);
    nan[3] = f32::NAN;
    let err = m
        .upsert("acme", vec![point("x", nan, json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid { what: "vector", .. }),
        "{err}"
    );
    let reserved = point("x", axis(0, 0.0), json!({"_soma_tenant": "globex"}));
    let err = m.upsert("acme", vec![reserved]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "payload key",
                ..
            }
        ),
        "{err}"
    );
    let err = m
        .upsert("", vec![point("x", axis(0, 0.0), json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid { what: "tenant", .. }),
        "{err}"
    );
    let err = m.search("acme", &axis(0, 0.0), 0, None).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { what: "k", .. }), "{err}");
    let err = m.search("acme", &[1.0; 3], 1, None).await.unwrap_err();
    assert!(matches!(err, Error::Dimension { .. }), "{err}");
    let bad = Filter::keyword("_soma_tenant", "globex");
    let err = m.count("acme", Some(&bad)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "payload key",
                ..
            }
        ),
        "{err}"
    );
    // A batch with one bad point stores none of it.
    let batch = vec![
        point("ok", axis(0, 0.0), json!({})),
        point("", axis(0, 0.0), json!({})),
    ];
    assert!(m.upsert("acme", batch).await.is_err());
    assert_eq!(m.count("acme", None).await.unwrap(), 0);
    let _ = Map::<String, Value>::new();
}
