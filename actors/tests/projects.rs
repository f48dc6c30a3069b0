//! KAMACHIQ projects on a real runtime: approval across a restart, rejection with its
//! compensations in reverse completion order, the kill switch while a tool runs, retries with
//! backoff, the constitution escalating and denying task starts, a cycle refused at start, the
//! audit trail, and a plan written by the real SmolLM2 under the plan schema that validates
//! and runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use soma_actors::{
    CallStatus, Constitution, Error, Gate, Invocation, Phase, Plan, PlanRequest, ProjectDeps,
    ProjectEventKind, ProjectOptions, ProjectStatus, Projects, RetryPolicy, TaskKind,
    TenantSettings, Tenants, Tool, ToolCalls, ToolError, ToolErrorKind, ToolRegistry,
};
use soma_adapters::{EventStream, SledLog, Topic};
use soma_inference::{GeneratorConfig, GeneratorPool};
use soma_supervision::{Runtime, RuntimeOptions};

/// Records each run (`tool:task`); `slow` sleeps 30 s, `flaky` fails the first two runs of a
/// key, `undo` undoes.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

struct Work {
    name: &'static str,
    log: Log,
    flaky: Arc<Mutex<BTreeMap<String, u32>>>,
}

#[async_trait]
impl Tool for Work {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        "Test work."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"task": {"type": "string"}}, "required": ["task"], "additionalProperties": false})
    }
    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let task = call.arguments["task"].as_str().unwrap_or("?").to_string();
        self.log
            .0
            .lock()
            .unwrap()
            .push(format!("{}:{task}", self.name));
        match self.name {
            "t.slow" => tokio::time::sleep(Duration::from_secs(30)).await,
            "t.flaky" => {
                let mut f = self.flaky.lock().unwrap();
                let n = f.entry(task.clone()).or_default();
                *n += 1;
                if *n <= 2 {
                    return Err(ToolError::retryable(format!("run {n} fails")));
                }
            }
            _ => {}
        }
        Ok(json!({"task": task, "made": format!("{task}-thing")}))
    }
}

struct Node {
    rt: Runtime,
    tenants: Tenants,
    calls: ToolCalls,
    projects: Projects,
    events: Arc<SledLog>,
}

async fn open(dir: &Path, log: &Log, generators: bool) -> Node {
    let rt = Runtime::open(RuntimeOptions::new(dir.join("journal")))
        .await
        .unwrap();
    let events = Arc::new(SledLog::open(dir.join("events")).unwrap());
    let tenants = Tenants::open_with_events(&rt, Some(events.clone()))
        .await
        .unwrap();
    let mut tools = ToolRegistry::new();
    let flaky = Arc::default();
    for name in ["t.work", "t.slow", "t.flaky", "t.undo"] {
        tools
            .register(Work {
                name,
                log: log.clone(),
                flaky: Arc::clone(&flaky),
            })
            .unwrap();
    }
    // One run per call: the project's own retry policy is what the tests see.
    let retry = RetryPolicy {
        max_attempts: 1,
        backoff: Duration::from_millis(1),
    };
    let calls = ToolCalls::open(&rt, tenants.clone(), Arc::new(tools), retry)
        .await
        .unwrap();
    let mut pools = BTreeMap::new();
    if generators {
        let pool = GeneratorPool::start(
            common::generator(),
            GeneratorConfig {
                replicas: 1,
                ..GeneratorConfig::default()
            },
        )
        .await
        .unwrap();
        pools.insert(common::MODEL.to_string(), Arc::new(pool));
    }
    let projects = Projects::open(
        &rt,
        ProjectDeps {
            tenants: tenants.clone(),
            tool_calls: calls.clone(),
            generators: pools,
        },
        ProjectOptions::default(),
    )
    .await
    .unwrap();
    if tenants.get("acme").await.is_err() {
        tenants
            .create("acme", TenantSettings::default())
            .await
            .unwrap();
        constitution(&tenants, 2, "").await;
    }
    Node {
        rt,
        tenants,
        calls,
        projects,
        events,
    }
}

/// The default constitution allowing the test tools, with `extra` rules.
async fn constitution(tenants: &Tenants, version: u64, extra: &str) {
    let mut c = Constitution::default_for_tenant();
    c.version = version;
    c.policy.push_str(extra);
    c.data["tools"]["allowed"] = json!(["t.work", "t.slow", "t.flaky", "t.undo"]);
    tenants.set_constitution("acme", c).await.unwrap();
}

async fn close(n: Node) {
    n.projects.shutdown().await;
    n.rt.shutdown().await.unwrap();
}

fn plan(v: Value) -> Plan {
    Plan::from_json(&v.to_string()).unwrap()
}

fn work(id: &str, deps: &[&str]) -> Value {
    json!({"id": id, "kind": "tool", "tool": "t.work", "arguments": {"task": id}, "depends_on": deps})
}

fn undoable(id: &str, deps: &[&str]) -> Value {
    json!({"id": id, "kind": "tool", "tool": "t.work", "arguments": {"task": id}, "depends_on": deps,
           "compensation": {"tool": "t.undo", "arguments": {"task": "{{tasks.ID.output.made}}".replace("ID", id)}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_survives_a_restart_and_the_plan_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    let mut gated = work("deploy", &["build"]);
    gated["approval"] = json!(true);
    let p = plan(json!({"tasks": [work("build", &[]), gated, work("announce", &["deploy"])]}));
    n.projects
        .start("acme", "rel", "alice", "ship it", p)
        .await
        .unwrap();
    let mut sub = n.projects.subscribe("acme", "rel", 1).await.unwrap();
    loop {
        let e = sub.next().await.unwrap().unwrap();
        if let ProjectEventKind::TaskAwaiting { task, gate } = e.kind {
            assert_eq!(task, "deploy");
            assert!(matches!(gate, Gate::Start { .. }));
            break;
        }
    }
    assert_eq!(log.lines(), ["t.work:build"]);
    close(n).await;

    let n = open(dir.path(), &log, false).await;
    let info = n.projects.status("acme", "rel").await.unwrap();
    assert_eq!(info.task("deploy").unwrap().phase, Phase::Gated);
    assert_eq!(info.task("announce").unwrap().phase, Phase::Waiting);
    // Approving what does not wait is refused.
    assert!(matches!(
        n.projects
            .approve("acme", "rel", "announce", "bob", "")
            .await,
        Err(Error::NotAwaiting { .. })
    ));
    n.projects
        .approve("acme", "rel", "deploy", "bob", "looks good")
        .await
        .unwrap();
    let info = n.projects.wait_ended("acme", "rel").await.unwrap();
    assert_eq!(info.status, ProjectStatus::Succeeded);
    let d = info.task("deploy").unwrap().decided.clone().unwrap();
    assert!(d.approved && d.by == "bob" && d.comment == "looks good");
    assert_eq!(
        log.lines(),
        ["t.work:build", "t.work:deploy", "t.work:announce"]
    );
    // Every change is on agent.audit, with the project as its actor.
    let records = n
        .events
        .read(Topic::AgentAudit, 0, 0, 10_000, Duration::ZERO)
        .await
        .unwrap();
    let actions: Vec<String> = records
        .iter()
        .filter_map(|r| {
            let e: soma_adapters::AuditEvent = r.envelope.decode().ok()?;
            (e.actor == "project/rel").then_some(e.action)
        })
        .collect();
    for want in [
        "project.started",
        "project.task_awaiting",
        "project.task_decided",
        "project.task_done",
        "project.succeeded",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} missing: {actions:?}"
        );
    }
    close(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_fails_the_project_after_undoing_in_reverse_completion_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    let p = plan(json!({"tasks": [
        undoable("a", &[]),
        undoable("b", &["a"]),
        undoable("c", &["b"]),
        {"id": "check", "kind": "approval", "prompt": "Publish?", "depends_on": ["c"]},
        work("publish", &["check"]),
    ]}));
    n.projects
        .start("acme", "pub", "alice", "publish", p)
        .await
        .unwrap();
    let mut sub = n.projects.subscribe("acme", "pub", 1).await.unwrap();
    while !matches!(
        sub.next().await.unwrap().unwrap().kind,
        ProjectEventKind::TaskAwaiting { .. }
    ) {}
    let info = n
        .projects
        .reject("acme", "pub", "check", "carol", "not now")
        .await
        .unwrap();
    assert_eq!(info.task("check").unwrap().phase, Phase::Failed);
    let info = n.projects.wait_ended("acme", "pub").await.unwrap();
    match &info.status {
        ProjectStatus::Failed { task, error } => {
            assert_eq!(task, "check");
            assert!(
                error.contains("carol") && error.contains("not now"),
                "{error}"
            );
        }
        other => panic!("ended {other:?}"),
    }
    // The undo of each completed task, newest first, with its own output as arguments.
    assert_eq!(
        log.lines(),
        [
            "t.work:a",
            "t.work:b",
            "t.work:c",
            "t.undo:c-thing",
            "t.undo:b-thing",
            "t.undo:a-thing"
        ]
    );
    assert_eq!(info.task("publish").unwrap().phase, Phase::Cancelled);
    // Nothing can be decided or killed once it ended.
    assert!(matches!(
        n.projects.kill("acme", "pub", "ops", "late").await,
        Err(Error::Ended { .. })
    ));
    close(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_cancels_a_running_tool_and_nothing_else_starts() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    let slow =
        json!({"id": "crawl", "kind": "tool", "tool": "t.slow", "arguments": {"task": "crawl"}});
    let p = plan(json!({"tasks": [slow, work("index", &["crawl"])]}));
    n.projects
        .start("acme", "big", "alice", "crawl", p.clone())
        .await
        .unwrap();
    n.projects
        .start("acme", "big2", "alice", "crawl", p)
        .await
        .unwrap();
    // Both slow runs are under way.
    let t0 = Instant::now();
    while log.lines().len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the slow tools never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    let info = n
        .projects
        .kill("acme", "big", "ops", "runaway crawl")
        .await
        .unwrap();
    assert_eq!(
        info.status,
        ProjectStatus::Killed {
            by: "ops".into(),
            reason: "runaway crawl".into()
        }
    );
    assert_eq!(info.task("crawl").unwrap().phase, Phase::Cancelled);
    // The tool call itself was cancelled (its record says so), promptly.
    let t1 = Instant::now();
    let call = loop {
        let id = format!("kq-big-{}-1", tag("big", "crawl"));
        // Not found while the call still runs: its record is committed when it ends.
        match n.calls.get("acme", &id).await {
            Ok(r) if r.status.is_some() => break r,
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => panic!("reading the call: {e}"),
        }
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "the call was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    match call.status {
        Some(CallStatus::Failed { error }) => assert_eq!(error.kind, ToolErrorKind::Cancelled),
        other => panic!("the cut call ended {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The tenant's kill switch stops the other project too.
    assert_eq!(
        n.projects
            .kill_tenant("acme", "ops", "tenant stop")
            .await
            .unwrap(),
        1
    );
    let info = n.projects.status("acme", "big2").await.unwrap();
    assert!(matches!(info.status, ProjectStatus::Killed { .. }));
    // A killed project does not come back after a restart.
    close(n).await;
    let n = open(dir.path(), &log, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(n.projects.runners(), 0);
    assert!(!log.lines().iter().any(|l| l == "t.work:index"));
    assert!(matches!(
        n.projects.approve("acme", "big", "crawl", "x", "").await,
        Err(Error::Ended { .. })
    ));
    close(n).await;
}

/// The tag of a task's call ids, as the runtime derives it.
fn tag(project: &str, task: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(project.as_bytes());
    h.update([0]);
    h.update(task.as_bytes());
    h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_runs_are_retried_with_backoff_then_the_task_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    let flaky = json!({"id": "fetch", "kind": "tool", "tool": "t.flaky", "arguments": {"task": "fetch"},
                       "retry": {"max_attempts": 3, "backoff_ms": 50}});
    let t0 = Instant::now();
    n.projects
        .start(
            "acme",
            "r",
            "alice",
            "fetch",
            plan(json!({"tasks": [flaky]})),
        )
        .await
        .unwrap();
    let info = n.projects.wait_ended("acme", "r").await.unwrap();
    assert_eq!(info.status, ProjectStatus::Succeeded);
    assert_eq!(info.task("fetch").unwrap().attempts, 3);
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "backoff 50 then 100 ms"
    );
    // One more failure than the policy allows fails the project.
    let flaky = json!({"id": "fetch", "kind": "tool", "tool": "t.flaky", "arguments": {"task": "other"},
                       "retry": {"max_attempts": 2, "backoff_ms": 1}});
    n.projects
        .start(
            "acme",
            "r2",
            "alice",
            "fetch",
            plan(json!({"tasks": [flaky]})),
        )
        .await
        .unwrap();
    let info = n.projects.wait_ended("acme", "r2").await.unwrap();
    assert!(
        matches!(info.status, ProjectStatus::Failed { .. }),
        "{:?}",
        info.status
    );
    assert!(
        info.task("fetch")
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("run 2 fails")
    );
    close(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_constitution_escalates_or_denies_task_starts() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    constitution(
        &n.tenants,
        3,
        r#"
escalate contains "deploys need a human" if {
    input.action == "task.start"
    input.resource.task == "deploy"
}
deny contains "no dropping tables" if {
    input.action == "task.start"
    input.resource.task == "drop"
}
"#,
    )
    .await;
    let p = plan(json!({"tasks": [work("deploy", &[])]}));
    n.projects
        .start("acme", "e", "alice", "go", p)
        .await
        .unwrap();
    let mut sub = n.projects.subscribe("acme", "e", 1).await.unwrap();
    let reasons = loop {
        if let ProjectEventKind::TaskAwaiting {
            gate: Gate::Start { reasons },
            ..
        } = sub.next().await.unwrap().unwrap().kind
        {
            break reasons;
        }
    };
    assert_eq!(reasons, ["deploys need a human"]);
    assert!(log.lines().is_empty());
    n.projects
        .approve("acme", "e", "deploy", "bob", "ok")
        .await
        .unwrap();
    let info = n.projects.wait_ended("acme", "e").await.unwrap();
    assert_eq!(info.status, ProjectStatus::Succeeded);
    assert_eq!(log.lines(), ["t.work:deploy"]);

    let p = plan(json!({"tasks": [work("drop", &[])]}));
    n.projects
        .start("acme", "d", "alice", "go", p)
        .await
        .unwrap();
    let info = n.projects.wait_ended("acme", "d").await.unwrap();
    match info.status {
        ProjectStatus::Failed { error, .. } => {
            assert!(error.contains("no dropping tables"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(log.lines(), ["t.work:deploy"]);
    close(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_and_other_bad_plans_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    let p = plan(json!({"tasks": [work("a", &["c"]), work("b", &["a"]), work("c", &["b"])]}));
    let e = n
        .projects
        .start("acme", "x", "alice", "loop", p)
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("cycle") && text.contains("a") && text.contains(" -> "),
        "{text}"
    );
    let unknown =
        plan(json!({"tasks": [{"id": "a", "kind": "tool", "tool": "rm.rf", "arguments": {}}]}));
    let e = n
        .projects
        .start("acme", "x", "alice", "rm", unknown)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown tool \"rm.rf\""), "{e}");
    let agent = plan(json!({"tasks": [{"id": "a", "kind": "agent", "prompt": "hi"}]}));
    let e = n
        .projects
        .start("acme", "x", "alice", "talk", agent)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no model is loaded"), "{e}");
    assert!(Plan::from_json(r#"{"tasks": [], "extra": 1}"#).is_err());
    assert!(matches!(
        n.projects.status("acme", "x").await,
        Err(Error::NotFound { .. })
    ));
    // An id in use.
    n.projects
        .start(
            "acme",
            "x",
            "alice",
            "ok",
            plan(json!({"tasks": [work("a", &[])]})),
        )
        .await
        .unwrap();
    let e = n
        .projects
        .start(
            "acme",
            "x",
            "alice",
            "ok",
            plan(json!({"tasks": [work("a", &[])]})),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    close(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_written_by_smollm2_under_the_schema_validates_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, true).await;
    let req = PlanRequest {
        goal: "Write a short note about green tea.".into(),
        model: None,
        max_tasks: 3,
        task_max_tokens: 12,
    };
    let p = n
        .projects
        .generate_plan("acme", "alice", req)
        .await
        .unwrap();
    eprintln!("generated: {}", serde_json::to_string(&p).unwrap());
    assert!(!p.tasks.is_empty() && p.tasks.len() <= 3);
    assert!(p.tasks.iter().all(|t| t.kind != TaskKind::Tool));
    n.projects
        .start("acme", "tea", "alice", "a note about tea", p)
        .await
        .unwrap();
    // Approval tasks the model asked for are approved as they come.
    let mut sub = n.projects.subscribe("acme", "tea", 1).await.unwrap();
    loop {
        let info = n.projects.status("acme", "tea").await.unwrap();
        if info.status.is_final() {
            assert_eq!(info.status, ProjectStatus::Succeeded);
            for t in info.tasks.iter().filter(|t| t.kind == TaskKind::Agent) {
                let out = t
                    .output
                    .as_ref()
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                assert!(!out.is_empty(), "task {} answered nothing", t.id);
            }
            break;
        }
        if let ProjectEventKind::TaskAwaiting { task, .. } = sub.next().await.unwrap().unwrap().kind
        {
            n.projects
                .approve("acme", "tea", &task, "alice", "ok")
                .await
                .unwrap();
        }
    }
    close(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capsules_are_versioned_templates_whose_arguments_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let n = open(dir.path(), &log, false).await;
    let capsule: soma_actors::Capsule = serde_json::from_value(json!({
        "description": "build then ship",
        "params": {
            "target": {"type": "string"},
            "copies": {"type": "integer", "default": 2}
        },
        "plan": {"tasks": [
            {"id": "build", "kind": "tool", "tool": "t.work", "arguments": {"task": "build-{{params.target}}"}},
            {"id": "ship", "kind": "tool", "tool": "t.work", "arguments": {"task": "ship-{{params.target}}x{{params.copies}}"}, "depends_on": ["build"]}
        ]}
    }))
    .unwrap();
    assert_eq!(
        n.projects
            .create_capsule("acme", "release", &capsule)
            .await
            .unwrap(),
        1
    );
    let mut v2 = capsule.clone();
    v2.description = "version two".into();
    assert_eq!(
        n.projects
            .create_capsule("acme", "release", &v2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        n.projects.capsules("acme").await.unwrap(),
        [("release".to_string(), 2)]
    );
    assert_eq!(
        n.projects
            .capsule("acme", "release", Some(1))
            .await
            .unwrap()
            .1,
        capsule
    );
    let args = |v: Value| v.as_object().unwrap().clone();
    let info = n
        .projects
        .start_from_capsule(
            "acme",
            "c1",
            "alice",
            "ship web",
            "release",
            None,
            &args(json!({"target": "web"})),
        )
        .await
        .unwrap();
    assert_eq!(info.tasks.len(), 2);
    n.projects.wait_ended("acme", "c1").await.unwrap();
    assert_eq!(log.lines(), ["t.work:build-web", "t.work:ship-webx2"]);
    for (bad, want) in [
        (json!({}), "\"target\" is required"),
        (json!({"target": 3}), "must be of type string"),
        (
            json!({"target": "x", "copies": "two"}),
            "must be of type integer",
        ),
        (
            json!({"target": "x", "colour": "red"}),
            "no parameter \"colour\"",
        ),
    ] {
        let e = n
            .projects
            .start_from_capsule("acme", "c2", "alice", "g", "release", Some(1), &args(bad))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e} (wanted {want})");
    }
    // A template that is not a valid plan is refused when it is created.
    let mut broken = capsule.clone();
    broken.plan["tasks"][0]["tool"] = json!("nope");
    let e = n
        .projects
        .create_capsule("acme", "bad", &broken)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown tool"), "{e}");
    let mut unknown = capsule;
    unknown.plan["tasks"][0]["arguments"]["task"] = json!("{{params.missing}}");
    let e = n
        .projects
        .create_capsule("acme", "bad", &unknown)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("unknown parameter \"missing\""),
        "{e}"
    );
    assert!(matches!(
        n.projects.capsule("acme", "bad", None).await,
        Err(Error::NotFound { .. })
    ));
    close(n).await;
}
