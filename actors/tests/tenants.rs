//! Tenants on a real runtime: lifecycle, constitutions across a restart, metering and
//! budgets enforced by the constitution.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use serde_json::json;
use soma_actors::{
    Action, Constitution, Decision, Error, Price, Principal, PrincipalKind, TenantSettings, Tenants,
};
use soma_supervision::{Runtime, RuntimeOptions};

const DAY: u64 = 86_400_000;

fn agent() -> Principal {
    Principal {
        kind: PrincipalKind::Agent,
        id: "agent-1".into(),
        roles: vec![],
    }
}

fn priced() -> TenantSettings {
    let mut s = TenantSettings {
        display_name: "Acme".into(),
        currency: "EUR".into(),
        ..Default::default()
    };
    s.prices.insert(
        "m".into(),
        Price {
            input_per_1k_micros: 1_000,
            output_per_1k_micros: 2_000,
        },
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_created_updated_suspended_and_not_found_when_absent() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(RuntimeOptions::new(dir.path()))
        .await
        .unwrap();
    let t = Tenants::open(&rt).await.unwrap();
    let acme = t.create("acme", priced()).await.unwrap();
    assert_eq!(acme.settings.display_name, "Acme");
    assert_eq!(
        acme.constitution.as_ref().unwrap().0,
        1,
        "the default constitution, version 1"
    );
    assert!(matches!(
        t.create("acme", priced()).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(t.get("beta").await, Err(Error::NotFound { .. })));
    assert!(matches!(t.get("Bad Id").await, Err(Error::InvalidId(_))));
    let mut s = priced();
    s.display_name = "Acme Corp".into();
    assert_eq!(
        t.update("acme", s).await.unwrap().settings.display_name,
        "Acme Corp"
    );
    assert!(matches!(
        t.update("beta", priced()).await,
        Err(Error::NotFound { .. })
    ));
    assert!(t.suspend("acme", true).await.unwrap().suspended);
    let v = t
        .decide(
            "acme",
            agent(),
            "session/1",
            Action::SessionMessage,
            json!({}),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        v.decision,
        Decision::Deny {
            reasons: vec!["the tenant is suspended".into()]
        }
    );
    assert!(!t.suspend("acme", false).await.unwrap().suspended);
    let v = t
        .decide(
            "acme",
            agent(),
            "session/1",
            Action::SessionMessage,
            json!({}),
            0,
        )
        .await
        .unwrap();
    assert_eq!(v.decision, Decision::Allow);
    // Another tenant's resource is denied whatever the action.
    let v = t
        .decide(
            "acme",
            agent(),
            "session/1",
            Action::MemoryRead,
            json!({"tenant": "beta"}),
            0,
        )
        .await
        .unwrap();
    assert!(matches!(v.decision, Decision::Deny { .. }));
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constitution_update_is_durable_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hash = {
        let rt = Runtime::open(RuntimeOptions::new(dir.path()))
            .await
            .unwrap();
        let t = Tenants::open(&rt).await.unwrap();
        t.create("acme", priced()).await.unwrap();
        let bad = Constitution {
            version: 2,
            policy: "package soma\nallow if {".into(),
            data: json!({}),
        };
        assert!(matches!(
            t.set_constitution("acme", bad).await,
            Err(Error::PolicyCompile { .. })
        ));
        assert_eq!(
            t.constitution("acme").await.unwrap().version,
            1,
            "the old one stays"
        );
        let mut c = Constitution::default_for_tenant();
        c.version = 2;
        c.policy
            .push_str("\ndeny contains \"no tasks here\" if input.action == \"task.start\"\n");
        let hash = t.set_constitution("acme", c.clone()).await.unwrap();
        assert!(matches!(
            t.set_constitution("acme", c).await,
            Err(Error::StaleVersion {
                current: 2,
                given: 2
            })
        ));
        rt.shutdown().await.unwrap();
        hash
    };
    // After a restart: the same constitution decides.
    let rt = Runtime::open(RuntimeOptions::new(dir.path()))
        .await
        .unwrap();
    let t = Tenants::open(&rt).await.unwrap();
    let v = t
        .decide(
            "acme",
            agent(),
            "project/1",
            Action::TaskStart,
            json!({}),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        v.decision,
        Decision::Deny {
            reasons: vec!["no tasks here".into()]
        }
    );
    assert_eq!((v.constitution, v.version), (hash, 2));
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_at_the_tenants_prices_and_budgets_and_quotas_deny() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(RuntimeOptions::new(dir.path()))
        .await
        .unwrap();
    let t = Tenants::open(&rt).await.unwrap();
    let mut s = priced();
    s.budget_micros = 10_000; // 0.01 EUR
    s.quotas.tokens_per_day = 5_000;
    t.create("acme", s).await.unwrap();
    let generate = |now| {
        t.decide(
            "acme",
            agent(),
            "session/1",
            Action::ModelGenerate,
            json!({"model": "m"}),
            now,
        )
    };
    assert_eq!(generate(0).await.unwrap().decision, Decision::Allow);
    // 2,000 in and 1,000 out: 2,000 + 2,000 micros.
    t.record_usage("acme", "m", 2_000, 1_000, 10).await.unwrap();
    t.record_usage("acme", "other", 100, 100, DAY + 10)
        .await
        .unwrap();
    let day0 = t.usage("acme", 0, DAY - 1).await.unwrap();
    assert_eq!(day0.total.cost_micros, 4_000);
    assert_eq!(
        (day0.total.tokens_in, day0.total.tokens_out),
        (2_000, 1_000)
    );
    let both = t.usage("acme", 0, 2 * DAY).await.unwrap();
    assert_eq!(both.by_model.len(), 2);
    assert_eq!(both.by_model["other"].cost_micros, 0, "no price: no cost");
    assert_eq!(generate(20).await.unwrap().decision, Decision::Allow);
    // Over the daily quota (3,000 + 2,000 tokens today).
    t.record_usage("acme", "m", 1_000, 1_000, 30).await.unwrap();
    match generate(40).await.unwrap().decision {
        Decision::Deny { reasons } => assert!(
            reasons
                .iter()
                .any(|r| r.contains("daily token quota of 5000")),
            "{reasons:?}"
        ),
        other => panic!("{other:?}"),
    }
    // The next day the quota is fresh, but the budget is spent (4,000 + 3,000 + 5,000 > 10,000).
    t.record_usage("acme", "m", 1_000, 2_000, DAY + 20)
        .await
        .unwrap();
    assert_eq!(
        generate(DAY + 30).await.unwrap().decision,
        Decision::Deny {
            reasons: vec!["the tenant's budget is spent".into()]
        }
    );
    assert_eq!(t.get("acme").await.unwrap().spent_micros, 12_000);
    rt.shutdown().await.unwrap();
}
