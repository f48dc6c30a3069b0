//! Tenant erasure with the real models: everything of the tenant leaves every store (sessions,
//! histories, tool calls, long-term memory, usage, dead letters), also while the tenant is in
//! use, and nothing of another tenant is touched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use soma_actors::{
    CallRequest, Error, Invocation, Persona, Principal, PrincipalKind, TenantSettings, Tool,
    ToolError, TurnEnd,
};

use common::{MODEL, Node, ended, persona};

fn request(tool: &str, arguments: Value) -> CallRequest {
    CallRequest {
        tool: tool.into(),
        arguments: arguments.to_string(),
        principal: Principal {
            kind: PrincipalKind::User,
            id: "alice".into(),
            roles: vec![],
        },
        session: None,
    }
}

/// A tool whose every run panics: its calls end in the dead letters.
struct Panics;

#[async_trait]
impl Tool for Panics {
    fn name(&self) -> &str {
        "test.panics"
    }
    fn description(&self) -> &str {
        "panics"
    }
    fn parameters(&self) -> Value {
        json!({"type": "object"})
    }
    async fn run(&self, _call: &Invocation) -> Result<Value, ToolError> {
        panic!("a tool that panics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_tenant_leaves_nothing_of_it_in_any_store() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::open(dir.path(), vec![Arc::new(Panics)]).await;
    for t in ["acme", "umbrella"] {
        n.tenants
            .create(t, TenantSettings::default())
            .await
            .unwrap();
        let mut c = soma_actors::Constitution::default_for_tenant();
        c.version = 2;
        c.data["tools"]["allowed"] = json!(["memory.remember", "test.panics"]);
        n.tenants.set_constitution(t, c).await.unwrap();
    }
    let s = &n.sessions;
    // Both tenants: a session with a remembered fact and history; a direct tool call.
    for t in ["acme", "umbrella"] {
        s.create(t, "s1", "alice", persona(&["memory.remember"]))
            .await
            .unwrap();
        let turn = s
            .send(
                t,
                "s1",
                &format!("Remember this: the launch code of {t} is blue."),
            )
            .await
            .unwrap();
        let events = s.wait_turn(t, "s1", turn).await.unwrap();
        assert_eq!(ended(&events), TurnEnd::Answered, "{events:?}");
        let req = request("memory.remember", json!({"text": "a direct fact"}));
        n.calls.call(t, "direct-1", req).await.unwrap();
        // A dead letter holding the tenant's request.
        let poison = n
            .calls
            .call(t, "poison-1", request("test.panics", json!({})))
            .await;
        assert!(
            matches!(poison, Err(Error::DeadLettered { .. })),
            "{poison:?}"
        );
        assert_eq!(n.calls.dead_letters(t).await.unwrap().len(), 1);
        // Deleted sessions are erased too.
        s.create(t, "gone", "alice", persona(&[])).await.unwrap();
        s.delete(t, "gone").await.unwrap();
    }
    let scope = |t: &str| soma_adapters::Scope::new(t, "s1").unwrap();
    let history = |t: &'static str| {
        let episodic = n.episodic.clone();
        async move {
            soma_adapters::EpisodicMemory::last(&*episodic, &scope(t), 100)
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(history("acme").await, 2);
    assert_eq!(n.memory.count("acme").await.unwrap(), 2);
    assert_eq!(s.stored_sessions("acme").await.unwrap(), 2);
    assert_eq!(n.calls.stored_calls("acme").await.unwrap(), 2);
    assert_eq!(n.tenants.stored_usage_days("acme").await.unwrap(), 1);

    let report = s.erase_tenant("acme", "root").await.unwrap();
    assert_eq!(
        (
            report.sessions,
            report.tool_calls,
            report.history_entries,
            report.memories,
            report.usage_days,
        ),
        (2, 2, 2, 2, 1),
        "{report:?}"
    );
    // Nothing of acme is left in any store.
    assert_eq!(history("acme").await, 0);
    assert_eq!(n.memory.count("acme").await.unwrap(), 0);
    assert_eq!(s.stored_sessions("acme").await.unwrap(), 0);
    assert_eq!(n.calls.stored_calls("acme").await.unwrap(), 0);
    assert_eq!(n.tenants.stored_usage_days("acme").await.unwrap(), 0);
    assert!(matches!(
        n.calls.dead_letters("acme").await,
        Err(Error::NotFound { .. })
    ));
    // Its messages left the journal's disk too (every segment holding them was handled).
    let inbox = dir.path().join("journal").join("inbox");
    for file in std::fs::read_dir(&inbox).unwrap() {
        let path = file.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("launch code of acme"),
            "{} still holds acme's message",
            path.display()
        );
    }
    assert!(matches!(
        s.get("acme", "s1").await,
        Err(Error::NotFound { .. })
    ));
    for id in ["s1-2-0", "direct-1"] {
        assert!(
            matches!(n.calls.get("acme", id).await, Err(Error::NotFound { .. })),
            "{id}"
        );
    }
    assert!(matches!(
        n.tenants.get("acme").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        n.tenants.usage("acme", 0, u64::MAX / 2).await,
        Err(Error::NotFound { .. })
    ));
    // One audit event says so.
    let audit = soma_adapters::EventStream::read(
        &*n.events,
        soma_adapters::Topic::AgentAudit,
        0,
        0,
        10_000,
        std::time::Duration::ZERO,
    )
    .await
    .unwrap();
    let erasures: Vec<soma_adapters::AuditEvent> = audit
        .iter()
        .filter(|r| r.envelope.tenant == "acme")
        .map(|r| r.envelope.decode::<soma_adapters::AuditEvent>().unwrap())
        .filter(|e| e.action == "tenant.erase")
        .collect();
    assert_eq!(erasures.len(), 1);
    assert_eq!(erasures[0].actor, "user/root");
    assert_eq!(erasures[0].detail["memories"], json!(2));
    // Erased again: there is nothing to erase.
    assert!(matches!(
        s.erase_tenant("acme", "root").await,
        Err(Error::NotFound { .. })
    ));
    // The other tenant keeps everything.
    assert_eq!(history("umbrella").await, 2);
    assert_eq!(n.memory.count("umbrella").await.unwrap(), 2);
    assert!(s.get("umbrella", "s1").await.is_ok());
    assert!(n.calls.get("umbrella", "direct-1").await.is_ok());
    assert_eq!(n.calls.dead_letters("umbrella").await.unwrap().len(), 1);
    assert_eq!(n.calls.stored_calls("umbrella").await.unwrap(), 2);
    assert_eq!(n.tenants.stored_usage_days("umbrella").await.unwrap(), 1);
    n.rt.shutdown().await.unwrap();
}

/// Sessions are created and talked to, tools called and usage recorded, without pause, while
/// the tenant is erased: whatever landed before is erased, whatever came after writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_tenant_in_use_leaves_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let n = Arc::new(Node::open(dir.path(), vec![]).await);
    for t in ["acme", "umbrella"] {
        n.tenants
            .create(t, TenantSettings::default())
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (before, after) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let erased = Arc::new(AtomicBool::new(false));
    let count = {
        let (before, after, erased) = (before.clone(), after.clone(), erased.clone());
        move |ok: bool| {
            if ok && !erased.load(Ordering::SeqCst) {
                before.fetch_add(1, Ordering::SeqCst);
            } else if !ok && erased.load(Ordering::SeqCst) {
                after.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let sessions = {
        let (n, stop, count) = (n.clone(), stop.clone(), count.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let id = format!("r{i}");
                let short = Persona {
                    max_tokens_per_turn: 2,
                    ..persona(&[])
                };
                let made = n.sessions.create("acme", &id, "alice", short).await;
                count(made.is_ok());
                let sent = n.sessions.send("acme", &id, "Say hello.").await;
                count(sent.is_ok());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i
        })
    };
    let calls = {
        let (n, stop, count) = (n.clone(), stop.clone(), count.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let req = request("memory.remember", json!({"text": format!("fact {i}")}));
                let done = n.calls.call("acme", &format!("c{i}"), req).await;
                count(done.is_ok());
                let used = n
                    .tenants
                    .record_usage_of("acme", MODEL, Some("alice"), Some("r1"), 10, 10, now())
                    .await;
                count(used.is_ok());
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = n.sessions.erase_tenant("acme", "root").await.unwrap();
    erased.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let made = sessions.await.unwrap();
    calls.await.unwrap();
    // The race happened: work landed before the erasure, and was refused after it.
    assert!(before.load(Ordering::SeqCst) > 0 && report.sessions > 0 && report.tool_calls > 0);
    assert!(after.load(Ordering::SeqCst) > 0);
    // Nothing is left, in any store.
    let s = &n.sessions;
    assert_eq!(s.stored_sessions("acme").await.unwrap(), 0);
    assert_eq!(n.calls.stored_calls("acme").await.unwrap(), 0);
    assert_eq!(n.tenants.stored_usage_days("acme").await.unwrap(), 0);
    assert_eq!(n.memory.count("acme").await.unwrap(), 0);
    for i in 1..=made {
        let scope = soma_adapters::Scope::new("acme", format!("r{i}")).unwrap();
        let left = soma_adapters::EpisodicMemory::last(&*n.episodic, &scope, 10)
            .await
            .unwrap();
        assert!(left.is_empty(), "history of r{i}: {left:?}");
    }
    assert!(matches!(
        n.tenants.get("acme").await,
        Err(Error::NotFound { .. })
    ));
    // The tenant can be created again, empty.
    n.tenants
        .create("acme", TenantSettings::default())
        .await
        .unwrap();
    assert_eq!(
        n.tenants.usage("acme", 0, now()).await.unwrap().total,
        Default::default()
    );
    assert_eq!(n.sessions.stored_sessions("acme").await.unwrap(), 0);
    n.rt.shutdown().await.unwrap();
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
