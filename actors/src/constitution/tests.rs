#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;

fn input(action: Action, resource: serde_json::Value, context: serde_json::Value) -> DecisionInput {
    DecisionInput {
        tenant: "acme".into(),
        principal: Principal {
            kind: PrincipalKind::Agent,
            id: "agent-1".into(),
            roles: vec![],
        },
        actor: "session/1".into(),
        action,
        resource,
        context,
    }
}

fn ctx() -> serde_json::Value {
    json!({"tokens_today": 10, "budget_left": 5.0, "now_ms": 0})
}

fn governed() -> Governance {
    let g = Governance::new();
    g.update("acme", Constitution::default_for_tenant())
        .unwrap();
    g
}

#[test]
fn the_default_constitution_allows_denies_and_escalates() {
    let g = governed();
    let d = |a, r, c| g.decide(&input(a, r, c)).unwrap().decision;
    assert_eq!(
        d(Action::ModelGenerate, json!({"model": "m"}), ctx()),
        Decision::Allow
    );
    assert_eq!(
        d(Action::ToolCall, json!({"tool": "memory.recall"}), ctx()),
        Decision::Allow
    );
    assert_eq!(
        d(Action::ToolCall, json!({"tool": "shell.exec"}), ctx()),
        Decision::Deny {
            reasons: vec!["tool shell.exec is not allowed".into()]
        }
    );
    assert_eq!(
        d(Action::ToolCall, json!({"tool": "http.request"}), ctx()),
        Decision::Escalate {
            reasons: vec!["tool http.request needs a human approval".into()]
        }
    );
    assert_eq!(
        d(
            Action::ModelGenerate,
            json!({}),
            json!({"tokens_today": 0, "budget_left": 0})
        ),
        Decision::Deny {
            reasons: vec!["the tenant's budget is spent".into()]
        }
    );
    assert_eq!(
        d(
            Action::ModelGenerate,
            json!({}),
            json!({"tokens_today": 1_000_000, "budget_left": 9})
        ),
        Decision::Deny {
            reasons: vec!["the daily token quota of 1000000 is used up".into()]
        }
    );
    assert_eq!(
        d(Action::MemoryRead, json!({"tenant": "other"}), ctx()),
        Decision::Deny {
            reasons: vec!["the resource belongs to another tenant".into()]
        }
    );
    assert_eq!(
        d(Action::MemoryErase, json!({}), ctx()),
        Decision::Deny {
            reasons: vec!["agents may not erase memory".into()]
        }
    );
    // Two reasons at once: both are given.
    match d(
        Action::ToolCall,
        json!({"tool": "shell.exec", "tenant": "other"}),
        ctx(),
    ) {
        Decision::Deny { reasons } => assert_eq!(reasons.len(), 2, "{reasons:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_constitution_that_does_not_compile_is_refused_and_the_old_one_stays() {
    let g = governed();
    let before = g.current("acme").unwrap();
    let bad = Constitution {
        version: 2,
        policy: "package soma\nallow if {".into(),
        data: json!({}),
    };
    let e = g.update("acme", bad).unwrap_err();
    assert!(matches!(e, Error::PolicyCompile { .. }), "{e}");
    assert_eq!(g.current("acme").unwrap(), before);
    let still = g
        .decide(&input(
            Action::ToolCall,
            json!({"tool": "shell.exec"}),
            ctx(),
        ))
        .unwrap();
    assert_eq!(still.constitution, before.hash());
    assert!(matches!(still.decision, Decision::Deny { .. }));
}

#[test]
fn an_update_takes_effect_for_the_next_decision_and_changes_the_hash() {
    let g = governed();
    let first = g
        .decide(&input(Action::TaskStart, json!({}), ctx()))
        .unwrap();
    assert_eq!(first.decision, Decision::Allow);
    let mut c = Constitution::default_for_tenant();
    c.version = 2;
    c.policy.push_str(
        "\ndeny contains \"no tasks on this tenant\" if input.action == \"task.start\"\n",
    );
    let hash = g.update("acme", c).unwrap();
    let next = g
        .decide(&input(Action::TaskStart, json!({}), ctx()))
        .unwrap();
    assert_eq!(
        next.decision,
        Decision::Deny {
            reasons: vec!["no tasks on this tenant".into()]
        }
    );
    assert_eq!(next.constitution, hash);
    assert_ne!(next.constitution, first.constitution);
    assert_eq!(next.version, 2);
}

#[test]
fn nothing_is_allowed_that_no_rule_allows_and_tenants_are_apart() {
    let g = Governance::new();
    g.update(
        "empty",
        Constitution {
            version: 1,
            policy: "package soma\n".into(),
            data: json!({}),
        },
    )
    .unwrap();
    let mut i = input(Action::ModelGenerate, json!({}), ctx());
    i.tenant = "empty".into();
    assert_eq!(
        g.decide(&i).unwrap().decision,
        Decision::Deny {
            reasons: vec!["no rule allows this action".into()]
        }
    );
    i.tenant = "nobody".into();
    assert!(matches!(g.decide(&i), Err(Error::NoConstitution(_))));
    assert!(matches!(
        g.update(
            "x",
            Constitution {
                version: 1,
                policy: "package soma\n".into(),
                data: json!([1])
            }
        ),
        Err(Error::PolicyData)
    ));
}

#[test]
fn the_hash_does_not_depend_on_the_order_of_keys() {
    let mut a = Constitution::default_for_tenant();
    let mut b = a.clone();
    a.data =
        serde_json::from_str(r#"{"x": 1, "y": {"p": [1, {"q": 2, "r": 3}], "o": true}}"#).unwrap();
    b.data =
        serde_json::from_str(r#"{"y": {"o": true, "p": [1, {"r": 3, "q": 2}]}, "x": 1}"#).unwrap();
    assert_eq!(a.hash(), b.hash());
    b.data["x"] = json!(2);
    assert_ne!(a.hash(), b.hash());
}

#[test]
fn a_policy_that_runs_too_long_denies_with_an_error_instead_of_stalling() {
    // Counts every pair of a long range: far more work than the budget allows.
    let slow = Constitution {
        version: 1,
        policy: "package soma\nallow if {\n  input.context.n > 0\n  count([x | some x in numbers.range(1, input.context.n); some y in numbers.range(1, input.context.n); x < y]) > 0\n}\n".into(),
        data: json!({}),
    };
    let compiled = Compiled::compile(&slow).unwrap();
    let started = std::time::Instant::now();
    let r = compiled.decide(&input(Action::TaskStart, json!({}), json!({"n": 100_000})));
    match &r {
        Err(Error::PolicyEval { message }) => assert!(
            message.contains("time") || message.contains("limit"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_input_value_is_the_document_serde_json_makes() {
    let mut i = input(
        Action::ToolCall,
        json!({"tool": "http.request", "n": -3, "f": 1.5, "big": u64::MAX, "list": [1, "a", null, true], "o": {"k": {}}}),
        json!({"tokens_today": 10, "budget_left": f64::MAX, "now_ms": 0, "suspended": false}),
    );
    i.principal.roles = vec!["admin".into(), "viewer".into()];
    for input in [
        i.clone(),
        input(Action::ModelGenerate, json!({}), json!(null)),
    ] {
        let parsed =
            regorus::Value::from_json_str(&serde_json::to_string(&input).unwrap()).unwrap();
        assert_eq!(input_value(&input), parsed, "{input:?}");
    }
}

#[test]
fn a_policy_with_only_some_of_the_rules_decides_and_sorts_its_reasons() {
    let g = Governance::new();
    let decide = |policy: &str| {
        g.update(
            "t",
            Constitution {
                version: 1,
                policy: policy.into(),
                data: json!({}),
            },
        )
        .unwrap();
        let mut i = input(Action::ModelGenerate, json!({}), ctx());
        i.tenant = "t".into();
        g.decide(&i).unwrap().decision
    };
    assert_eq!(decide("package soma\nallow if true\n"), Decision::Allow);
    assert_eq!(
        decide(
            "package soma\nallow if true\ndeny contains \"b\" if true\ndeny contains \"a\" if true\n"
        ),
        Decision::Deny {
            reasons: vec!["a".into(), "b".into()]
        }
    );
    assert_eq!(
        decide(
            "package soma\nallow if true\nescalate contains \"z\" if true\nescalate contains \"y\" if true\ndeny contains \"x\" if false\n"
        ),
        Decision::Escalate {
            reasons: vec!["y".into(), "z".into()]
        }
    );
}
