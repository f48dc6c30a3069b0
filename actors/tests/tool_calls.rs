//! Tool calls as durable actors, without a model: idempotency, retries, the constitution's
//! allow/deny/escalate, approvals across a restart, `http.request` limits, tenant isolation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use soma_actors::{
    CallRequest, CallStatus, Constitution, HttpLimits, HttpRequestTool, Invocation, Principal,
    PrincipalKind, RetryPolicy, TenantSettings, Tenants, Tool, ToolCalls, ToolError, ToolErrorKind,
    ToolRegistry,
};
use soma_adapters::{AuditEvent, EventStream, Outcome, PolicyDecision, SledLog, Topic};
use soma_supervision::{Runtime, RuntimeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts its runs; fails (retryably) the first `fail_first` of them.
struct Counting {
    name: &'static str,
    runs: Arc<AtomicU32>,
    fail_first: u32,
}

#[async_trait]
impl Tool for Counting {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        "counts"
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    }
    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run <= self.fail_first {
            return Err(ToolError::retryable(format!("run {run} fails")));
        }
        Ok(json!({"n": call.arguments["n"], "run": run, "key": call.idempotency_key}))
    }
}

struct Node {
    rt: Runtime,
    events: Arc<SledLog>,
    tenants: Tenants,
    calls: ToolCalls,
    runs: Arc<AtomicU32>,
    flaky: Arc<AtomicU32>,
}

fn agent() -> Principal {
    Principal {
        kind: PrincipalKind::Agent,
        id: "agent-1".into(),
        roles: vec![],
    }
}

fn req(tool: &str, args: Value) -> CallRequest {
    CallRequest {
        tool: tool.into(),
        arguments: args.to_string(),
        principal: agent(),
        session: None,
    }
}

async fn node(dir: &std::path::Path, http: bool) -> Node {
    let rt = Runtime::open(RuntimeOptions::new(dir)).await.unwrap();
    let events = Arc::new(SledLog::open(dir.join("events")).unwrap());
    let tenants = Tenants::open_with_events(&rt, Some(events.clone()))
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let flaky = Arc::new(AtomicU32::new(0));
    let mut tools = ToolRegistry::new();
    tools
        .register(Counting {
            name: "test.count",
            runs: runs.clone(),
            fail_first: 0,
        })
        .unwrap();
    tools
        .register(Counting {
            name: "test.flaky",
            runs: flaky.clone(),
            fail_first: 2,
        })
        .unwrap();
    tools
        .register(Counting {
            name: "test.gated",
            runs: runs.clone(),
            fail_first: 0,
        })
        .unwrap();
    if http {
        tools
            .register(HttpRequestTool::new(tenants.clone(), HttpLimits::default()).unwrap())
            .unwrap();
    }
    let retry = RetryPolicy {
        max_attempts: 3,
        backoff: Duration::from_millis(10),
    };
    let calls = ToolCalls::open(&rt, tenants.clone(), Arc::new(tools), retry)
        .await
        .unwrap();
    Node {
        rt,
        events,
        tenants,
        calls,
        runs,
        flaky,
    }
}

/// The default policy with the test tools allowed and `test.gated` needing an approval.
fn constitution(version: u64) -> Constitution {
    let mut c = Constitution::default_for_tenant();
    c.version = version;
    c.data["tools"] = json!({
        "allowed": ["test.count", "test.flaky", "test.gated", "http.request"],
        "approval": ["test.gated"],
    });
    c
}

async fn tenant(n: &Node, id: &str, allowed_hosts: &[&str]) {
    let settings = TenantSettings {
        allowed_hosts: allowed_hosts.iter().map(|h| h.to_string()).collect(),
        ..TenantSettings::default()
    };
    n.tenants.create(id, settings).await.unwrap();
    n.tenants
        .set_constitution(id, constitution(2))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_id_runs_once_and_its_record_is_returned_again() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    tenant(&n, "acme", &[]).await;
    let first = n
        .calls
        .call("acme", "c1", req("test.count", json!({"n": 7})))
        .await
        .unwrap();
    assert_eq!(
        first.outcome().unwrap().unwrap(),
        json!({"n": 7, "run": 1, "key": "acme/c1"})
    );
    // The same id again, even with other arguments: nothing runs, the record is returned.
    let again = n
        .calls
        .call("acme", "c1", req("test.count", json!({"n": 8})))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(n.runs.load(Ordering::SeqCst), 1);
    assert!(again.audit.iter().any(|a| a.event.contains("allow")));
    n.rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn retryable_failures_are_retried_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    tenant(&n, "acme", &[]).await;
    let r = n
        .calls
        .call("acme", "f1", req("test.flaky", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(r.attempts, 3);
    assert_eq!(r.outcome().unwrap().unwrap()["run"], json!(3));
    assert_eq!(n.flaky.load(Ordering::SeqCst), 3);
    n.rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_constitution_denies_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    // The default constitution allows only the built-in tools.
    n.tenants
        .create("acme", TenantSettings::default())
        .await
        .unwrap();
    let r = n
        .calls
        .call("acme", "d1", req("test.count", json!({"n": 1})))
        .await
        .unwrap();
    let e = r.outcome().unwrap().unwrap_err();
    assert_eq!(e.kind, ToolErrorKind::Denied);
    assert!(e.message.contains("test.count is not allowed"), "{e}");
    assert_eq!(n.runs.load(Ordering::SeqCst), 0);
    // Bad arguments and unknown tools end the call without running it.
    let r = n
        .calls
        .call("acme", "d2", req("nope", json!({})))
        .await
        .unwrap();
    assert_eq!(
        r.outcome().unwrap().unwrap_err().kind,
        ToolErrorKind::UnknownTool
    );
    n.tenants
        .set_constitution("acme", constitution(2))
        .await
        .unwrap();
    let r = n
        .calls
        .call("acme", "d3", req("test.count", json!({"m": 1})))
        .await
        .unwrap();
    assert_eq!(
        r.outcome().unwrap().unwrap_err().kind,
        ToolErrorKind::InvalidArguments
    );
    assert_eq!(n.runs.load(Ordering::SeqCst), 0);
    n.rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_escalated_call_waits_across_a_restart_for_its_approval() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    tenant(&n, "acme", &[]).await;
    let r = n
        .calls
        .call("acme", "g1", req("test.gated", json!({"n": 5})))
        .await
        .unwrap();
    assert!(
        matches!(&r.status, Some(CallStatus::Awaiting { reasons }) if reasons[0].contains("needs a human approval")),
        "{r:?}"
    );
    let r2 = n
        .calls
        .call("acme", "g2", req("test.gated", json!({"n": 6})))
        .await
        .unwrap();
    assert!(r2.outcome().is_none());
    assert_eq!(n.runs.load(Ordering::SeqCst), 0);
    n.rt.shutdown().await.unwrap();
    drop(n);

    let n = node(dir.path(), false).await;
    let r = n
        .calls
        .approve("acme", "g1", "alice", "fine")
        .await
        .unwrap();
    assert_eq!(r.outcome().unwrap().unwrap()["n"], json!(5));
    assert!(r.audit.iter().any(|a| a.event == "approved by alice: fine"));
    let r2 = n.calls.reject("acme", "g2", "bob", "no").await.unwrap();
    assert_eq!(
        r2.outcome().unwrap().unwrap_err().kind,
        ToolErrorKind::Rejected
    );
    assert_eq!(n.runs.load(Ordering::SeqCst), 1);
    // Decided once: a second approval is refused.
    assert!(
        n.calls
            .approve("acme", "g1", "alice", "again")
            .await
            .is_err()
    );
    n.rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tenant_cannot_read_or_decide_another_tenants_calls() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    tenant(&n, "acme", &[]).await;
    tenant(&n, "umbrella", &[]).await;
    n.calls
        .call("acme", "g1", req("test.gated", json!({"n": 5})))
        .await
        .unwrap();
    let nf = |e: soma_actors::Error| matches!(e, soma_actors::Error::NotFound { .. });
    assert!(nf(n.calls.get("umbrella", "g1").await.unwrap_err()));
    assert!(nf(n
        .calls
        .approve("umbrella", "g1", "mallory", "")
        .await
        .unwrap_err()));
    assert!(n.calls.get("acme", "g1").await.unwrap().outcome().is_none());
    // Call ids may be longer than other ids (an agent's are session-turn-step), to a limit.
    let long = format!("{}-123456-7", "s".repeat(64));
    let r = n
        .calls
        .call("acme", &long, req("test.count", json!({"n": 1})))
        .await
        .unwrap();
    assert!(r.outcome().unwrap().is_ok());
    let too_long = "c".repeat(soma_actors::MAX_CALL_ID + 1);
    assert!(matches!(
        n.calls.get("acme", &too_long).await,
        Err(soma_actors::Error::InvalidId(_))
    ));
    n.rt.shutdown().await.unwrap();
}

/// A plain HTTP/1.1 server on 127.0.0.1: `/ok` answers "hello", `/here` redirects to `/ok`,
/// `/away` redirects to another host (`localhost`), `/big` sends 2 MiB.
async fn http_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let resp = match path.as_str() {
                    "/ok" => "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello".to_string(),
                    "/here" => "HTTP/1.1 302 Found\r\nlocation: /ok\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
                    "/away" => format!("HTTP/1.1 302 Found\r\nlocation: http://localhost:{port}/ok\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
                    "/big" => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}", 2 << 20, "x".repeat(2 << 20)),
                    _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
                };
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn http_request_reaches_only_allowed_hosts_within_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let port = http_server().await;
    // An entry without a port allows only port 80; this one names the test server's.
    tenant(&n, "acme", &[&format!("127.0.0.1:{port}")]).await;
    tenant(&n, "other", &["127.0.0.1"]).await;
    let get = |path: &str| {
        req(
            "http.request",
            json!({"method": "GET", "url": format!("http://127.0.0.1:{port}{path}")}),
        )
    };
    let ok = n.calls.call("acme", "h1", get("/ok")).await.unwrap();
    let v = ok.outcome().unwrap().unwrap();
    assert_eq!(
        (v["status"].clone(), v["body"].clone()),
        (json!(200), json!("hello"))
    );
    let here = n.calls.call("acme", "h2", get("/here")).await.unwrap();
    assert_eq!(here.outcome().unwrap().unwrap()["body"], json!("hello"));
    let away = n.calls.call("acme", "h3", get("/away")).await.unwrap();
    let e = away.outcome().unwrap().unwrap_err();
    assert_eq!(e.kind, ToolErrorKind::Failed);
    assert!(e.message.contains("another host"), "{e}");
    let big = n.calls.call("acme", "h4", get("/big")).await.unwrap();
    assert!(
        big.outcome()
            .unwrap()
            .unwrap_err()
            .message
            .contains("larger than the limit")
    );
    // Another tenant's allow-list is its own.
    let other = n.calls.call("other", "h1", get("/ok")).await.unwrap();
    let e = other.outcome().unwrap().unwrap_err();
    assert_eq!(e.kind, ToolErrorKind::Denied);
    assert!(e.message.contains("allow-list"), "{e}");
    n.rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_decision_is_published_with_the_constitutions_hash() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    n.tenants
        .create("acme", TenantSettings::default())
        .await
        .unwrap();
    let hash = n.tenants.constitution("acme").await.unwrap().hash();
    // Denied by the default constitution, then allowed by one that allows it.
    n.calls
        .call("acme", "p1", req("test.count", json!({"n": 1})))
        .await
        .unwrap();
    let hash2 = n
        .tenants
        .set_constitution("acme", constitution(2))
        .await
        .unwrap();
    n.calls
        .call("acme", "p2", req("test.count", json!({"n": 1})))
        .await
        .unwrap();
    let read = |topic| {
        let events = n.events.clone();
        async move { events.read(topic, 0, 0, 100, Duration::ZERO).await.unwrap() }
    };
    let decisions: Vec<PolicyDecision> = read(Topic::PolicyDecisions)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r.envelope.tenant, "acme");
            r.envelope.decode().unwrap()
        })
        .collect();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert!(!decisions[0].allowed);
    assert_eq!(
        decisions[0].reasons,
        vec!["tool test.count is not allowed".to_string()]
    );
    assert!(decisions[0].policy_version.starts_with(&hash));
    assert!(decisions[1].allowed);
    assert!(decisions[1].policy_version.starts_with(&hash2));
    let audit: Vec<AuditEvent> = read(Topic::AgentAudit)
        .await
        .iter()
        .map(|r| r.envelope.decode().unwrap())
        .collect();
    assert_eq!(audit.len(), 2);
    assert_eq!(
        (audit[0].outcome, audit[1].outcome),
        (Outcome::Denied, Outcome::Succeeded)
    );
    assert_eq!(audit[0].action, "tool.call");
    assert_eq!(audit[0].actor, "tool-call/p1");
    assert_eq!(audit[1].detail["constitution"], json!(hash2));
    n.rt.shutdown().await.unwrap();
}
