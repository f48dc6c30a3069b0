//! Sessions with the real SmolLM2 model: an agent that remembers in one session and recalls in
//! another of the same tenant (never another tenant's), streaming and resubscribing, the
//! constitution's denies and budgets, and the isolation of sessions between tenants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::Value;
use soma_actors::{Error, EventKind, SessionEvent, TenantSettings, TurnEnd, Update};

use common::{MODEL, Node, ended, persona};

fn tool_result(events: &[SessionEvent]) -> (String, Value) {
    events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ToolResult {
                ok: true, result, ..
            } => Some(result.clone()),
            _ => None,
        })
        .map(|r| (r.clone(), serde_json::from_str(&r).unwrap()))
        .expect("a tool result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_remembers_in_one_session_and_recalls_in_another_of_its_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(dir.path(), vec![]).await;
    for t in ["acme", "umbrella"] {
        n.tenants
            .create(t, TenantSettings::default())
            .await
            .unwrap();
    }
    let s = &n.sessions;
    s.create("acme", "s1", "alice", persona(&["memory.remember"]))
        .await
        .unwrap();
    let mut sub = s.subscribe("acme", "s1", 1).await.unwrap();
    let turn = s
        .send("acme", "s1", "Remember this: my favourite colour is teal.")
        .await
        .unwrap();
    let events = s.wait_turn("acme", "s1", turn).await.unwrap();
    assert_eq!(ended(&events), TurnEnd::Answered, "{events:?}");
    let call = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ToolCall {
                tool, arguments, ..
            } => Some((tool.clone(), arguments.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(call.0, "memory.remember");
    let remembered: Value = serde_json::from_str(&call.1).unwrap();
    let remembered = remembered["text"].as_str().unwrap().to_string();
    assert!(!remembered.trim().is_empty());
    assert_eq!(n.memory.count("acme").await.unwrap(), 1);
    assert_eq!(n.memory.count("umbrella").await.unwrap(), 0);

    // What streamed: the events in order, and the answer's tokens before its event.
    let mut tokens = String::new();
    let mut streamed = Vec::new();
    while let Some(u) = sub.next().await {
        match u.unwrap() {
            Update::Token { turn: t, text } => {
                assert_eq!(t, turn);
                tokens.push_str(&text);
            }
            Update::Event(e) => {
                let done = matches!(e.kind, EventKind::TurnEnded { .. });
                streamed.push(e);
                if done {
                    break;
                }
            }
        }
    }
    let answer = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Answer { text } => Some(text.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(tokens.trim(), answer);
    assert_eq!(streamed, events);
    // A late subscriber gets what it missed, from the seq it asks for.
    let mut late = s.subscribe("acme", "s1", 3).await.unwrap();
    let Update::Event(first) = late.next().await.unwrap().unwrap() else {
        panic!("an event first")
    };
    assert_eq!(first, events[2]);

    // Another session of the same tenant recalls it; another tenant's does not.
    s.create("acme", "s2", "alice", persona(&["memory.recall"]))
        .await
        .unwrap();
    let turn = s
        .send("acme", "s2", "What is my favourite colour?")
        .await
        .unwrap();
    let events = s.wait_turn("acme", "s2", turn).await.unwrap();
    assert_eq!(ended(&events), TurnEnd::Answered, "{events:?}");
    let (_, result) = tool_result(&events);
    let texts: Vec<&str> = result["memories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec![remembered.as_str()]);

    s.create("umbrella", "s2", "mallory", persona(&["memory.recall"]))
        .await
        .unwrap();
    let turn = s
        .send("umbrella", "s2", "What is my favourite colour?")
        .await
        .unwrap();
    let events = s.wait_turn("umbrella", "s2", turn).await.unwrap();
    let (_, result) = tool_result(&events);
    assert_eq!(result["memories"], serde_json::json!([]), "{events:?}");

    // The history holds each turn's user message and answer once.
    let scope = soma_adapters::Scope::new("acme", "s1").unwrap();
    let history = soma_adapters::EpisodicMemory::last(&*n.episodic, &scope, 10)
        .await
        .unwrap();
    let roles: Vec<&str> = history.iter().map(|h| h.entry.role.as_str()).collect();
    assert_eq!(roles, vec!["user", "assistant"]);
    // Usage is metered per session and per tenant.
    let info = s.get("acme", "s1").await.unwrap();
    let (tin, tout) = info.usage[MODEL];
    assert!(tin > 0 && tout > 0, "{info:?}");
    let report = n.tenants.usage("acme", 0, u64::MAX / 2).await.unwrap();
    assert!(report.total.tokens_in >= tin);
    // ... and per user and session: alice's two sessions add up to her usage.
    let s1 = report.by_session["s1"];
    let s2 = report.by_session["s2"];
    assert_eq!((s1.tokens_in, s1.tokens_out), (tin, tout));
    assert_eq!(
        report.by_user["alice"].tokens_in,
        s1.tokens_in + s2.tokens_in
    );
    assert_eq!(report.by_user["alice"].tokens_in, report.total.tokens_in);
    n.rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_constitution_stops_a_turn_before_the_model_runs() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(dir.path(), vec![]).await;
    // A budget of one millionth, spent by the first call.
    let mut settings = TenantSettings {
        budget_micros: 1,
        ..TenantSettings::default()
    };
    settings.prices.insert(
        MODEL.into(),
        soma_actors::Price {
            input_per_1k_micros: 1000,
            output_per_1k_micros: 1000,
        },
    );
    n.tenants.create("acme", settings).await.unwrap();
    let s = &n.sessions;
    s.create("acme", "s1", "alice", persona(&[])).await.unwrap();
    let t1 = s.send("acme", "s1", "Hello!").await.unwrap();
    let e1 = s.wait_turn("acme", "s1", t1).await.unwrap();
    assert_eq!(ended(&e1), TurnEnd::Answered, "{e1:?}");
    let used = s.get("acme", "s1").await.unwrap().usage[MODEL];
    let t2 = s.send("acme", "s1", "Hello again!").await.unwrap();
    let e2 = s.wait_turn("acme", "s1", t2).await.unwrap();
    assert_eq!(
        ended(&e2),
        TurnEnd::Denied {
            reasons: vec!["the tenant's budget is spent".into()]
        }
    );
    // Denied before the model ran: nothing more was used.
    assert_eq!(s.get("acme", "s1").await.unwrap().usage[MODEL], used);
    // A suspended tenant's sessions are denied too.
    n.tenants.suspend("acme", true).await.unwrap();
    let t3 = s.send("acme", "s1", "Anyone?").await.unwrap();
    let e3 = s.wait_turn("acme", "s1", t3).await.unwrap();
    assert!(
        matches!(ended(&e3), TurnEnd::Denied { reasons } if reasons.contains(&"the tenant is suspended".to_string()))
    );
    n.rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reaches_no_session_of_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(dir.path(), vec![]).await;
    for t in ["acme", "umbrella"] {
        n.tenants
            .create(t, TenantSettings::default())
            .await
            .unwrap();
    }
    let s = &n.sessions;
    s.create("acme", "s1", "alice", persona(&[])).await.unwrap();
    let nf = |r: Result<(), Error>| {
        assert!(
            matches!(
                r,
                Err(Error::NotFound {
                    what: "session",
                    ..
                })
            ),
            "{r:?}"
        )
    };
    nf(s.get("umbrella", "s1").await.map(|_| ()));
    nf(s.send("umbrella", "s1", "hi").await.map(|_| ()));
    nf(s.events("umbrella", "s1", 1, 10).await.map(|_| ()));
    nf(s.subscribe("umbrella", "s1", 1).await.map(|_| ()));
    nf(s.cancel("umbrella", "s1").await.map(|_| ()));
    nf(s.decide_approval("umbrella", "s1", "s1-1-0", true, "m", "")
        .await
        .map(|_| ()));
    nf(s.delete("umbrella", "s1").await);
    // Still there for its own tenant; bad ids and unknown models are refused by name.
    assert_eq!(s.get("acme", "s1").await.unwrap().user, "alice");
    assert!(matches!(
        s.get("acme", "S 1").await,
        Err(Error::InvalidId(_))
    ));
    let mut bad = persona(&[]);
    bad.model = "gpt-9".into();
    let e = s.create("acme", "s2", "alice", bad).await.unwrap_err();
    assert!(
        e.to_string().contains("model \"gpt-9\" is not loaded"),
        "{e}"
    );
    let e = s
        .create("acme", "s2", "alice", persona(&["shell.exec"]))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("tool \"shell.exec\" is not registered"),
        "{e}"
    );
    // Deleted: gone for everyone, history erased.
    s.delete("acme", "s1").await.unwrap();
    nf(s.get("acme", "s1").await.map(|_| ()));
    n.rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_opens_at_most_its_quota_of_sessions_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(dir.path(), vec![]).await;
    let mut settings = TenantSettings::default();
    settings.quotas.concurrent_sessions = 2;
    n.tenants.create("acme", settings).await.unwrap();
    n.tenants
        .create("umbrella", TenantSettings::default())
        .await
        .unwrap();
    let s = &n.sessions;
    s.create("acme", "s1", "alice", persona(&[])).await.unwrap();
    s.create("acme", "s2", "alice", persona(&[])).await.unwrap();
    let e = s
        .create("acme", "s3", "alice", persona(&[]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::QuotaExceeded { limit: 2, .. }), "{e}");
    assert!(matches!(
        s.get("acme", "s3").await,
        Err(Error::NotFound { .. })
    ));
    // Another tenant's quota is its own; a deleted session frees its place.
    s.create("umbrella", "s3", "bob", persona(&[]))
        .await
        .unwrap();
    s.delete("acme", "s1").await.unwrap();
    s.create("acme", "s3", "alice", persona(&[])).await.unwrap();
    n.rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalated_step_waits_across_a_restart_for_a_human() {
    let dir = tempfile::tempdir().unwrap();
    {
        let n = Node::open(dir.path(), vec![]).await;
        n.tenants
            .create("acme", TenantSettings::default())
            .await
            .unwrap();
        let mut c = soma_actors::Constitution::default_for_tenant();
        c.version = 2;
        c.policy.push_str(
            "\nescalate contains \"model calls need an approval\" if input.action == \"model.generate\"\n",
        );
        n.tenants.set_constitution("acme", c).await.unwrap();
        let s = &n.sessions;
        s.create("acme", "s1", "alice", persona(&[])).await.unwrap();
        let turn = s.send("acme", "s1", "Hello!").await.unwrap();
        let events = s.wait_turn("acme", "s1", turn).await.unwrap();
        let gate = format!("s1-{turn}-0-generate");
        assert_eq!(
            ended(&events),
            TurnEnd::AwaitingApproval {
                approval: gate.clone()
            }
        );
        assert_eq!(
            s.get("acme", "s1").await.unwrap().waiting,
            Some((turn, gate.clone()))
        );
        // Nothing ran: no tokens were used.
        assert!(s.get("acme", "s1").await.unwrap().usage.is_empty());
        assert!(matches!(
            s.decide_approval("acme", "s1", "s1-99-0-generate", true, "bob", "")
                .await,
            Err(Error::NotFound { .. })
        ));
        // A message sent while a turn waits runs after it, not instead of it.
        let second = s.send("acme", "s1", "Again!").await.unwrap();
        let events = s.wait_turn("acme", "s1", second).await.unwrap();
        assert!(
            events
                .iter()
                .all(|e| !matches!(e.kind, EventKind::TurnEnded { .. })),
            "{events:?}"
        );
        n.rt.shutdown().await.unwrap();
    }
    // Restarted: the turn still waits; approved, it runs to its answer.
    let n = Node::open(dir.path(), vec![]).await;
    let s = &n.sessions;
    let (turn, gate) = s.get("acme", "s1").await.unwrap().waiting.unwrap();
    let resumed = s
        .decide_approval("acme", "s1", &gate, true, "bob", "ok")
        .await
        .unwrap();
    // The turn runs again from its start and ends with its answer.
    let mut sub = s.subscribe("acme", "s1", 1).await.unwrap();
    let end = loop {
        if let Some(Ok(Update::Event(e))) = sub.next().await
            && e.turn == turn
            && let EventKind::TurnEnded { end } = e.kind
            && end
                != (TurnEnd::AwaitingApproval {
                    approval: gate.clone(),
                })
        {
            break end;
        }
    };
    assert_eq!(end, TurnEnd::Answered);
    s.wait_turn("acme", "s1", resumed).await.unwrap();
    let events = s.events("acme", "s1", 1, 100).await.unwrap();
    let answers = events
        .iter()
        .filter(|e| e.turn == turn && matches!(e.kind, EventKind::Answer { .. }))
        .count();
    assert_eq!(answers, 1);
    // The deferred message's turn ran next and waits for its own approval; rejected, it
    // ends denied, saying by whom.
    let (turn2, approval) = s.get("acme", "s1").await.unwrap().waiting.unwrap();
    assert!(turn2 > turn);
    assert_eq!(approval, format!("s1-{turn2}-0-generate"));
    s.decide_approval("acme", "s1", &approval, false, "bob", "not now")
        .await
        .unwrap();
    let mut sub = s.subscribe("acme", "s1", 1).await.unwrap();
    let end = loop {
        if let Some(Ok(Update::Event(e))) = sub.next().await
            && e.turn == turn2
            && let EventKind::TurnEnded { end } = e.kind
            && end
                != (TurnEnd::AwaitingApproval {
                    approval: approval.clone(),
                })
        {
            break end;
        }
    };
    assert_eq!(
        end,
        TurnEnd::Denied {
            reasons: vec!["rejected by bob: not now".into()]
        }
    );
    n.rt.shutdown().await.unwrap();
}
