//! P8: KAMACHIQ scheduling, durable throughout (`Durability::FlushPerBatch`).
//!
//! 1. Start latency: `Projects::start` of a one-task plan, from the call to (a) its return
//!    (the goal accepted and durable, the first wave dispatched by the committed start) and
//!    (b) the task's tool beginning its run (after the `task.start` decision and the tool
//!    call's own durable append and decision); 300 projects one after another.
//! 2. A 10,000-task random DAG (each task depends on up to 3 of the 50 before it) of no-op
//!    tool tasks, 256 at once, against the same 10,000 no-op tool calls made directly through
//!    `ToolCalls::call` at the same concurrency, side by side: the difference is what the
//!    project adds (its state machine, its commits, its runners and `task.start` decisions).
//!
//! `cargo bench -p soma-actors --bench p8_projects`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use soma_actors::{
    CallRequest, Constitution, Invocation, Plan, Principal, PrincipalKind, ProjectDeps,
    ProjectOptions, ProjectStatus, Projects, RetryPolicy, TenantSettings, Tenants, Tool, ToolCalls,
    ToolError, ToolRegistry,
};
use soma_supervision::{Runtime, RuntimeOptions};
use tokio::sync::mpsc;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Noop {
    began: mpsc::UnboundedSender<(u64, Instant)>,
}

#[async_trait]
impl Tool for Noop {
    fn name(&self) -> &str {
        "bench.noop"
    }
    fn description(&self) -> &str {
        "Does nothing."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false})
    }
    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let n = call.arguments["n"].as_u64().unwrap_or(0);
        let _ = self.began.send((n, Instant::now()));
        Ok(json!({"n": n}))
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(RuntimeOptions::new(dir.path().join("journal")))
        .await
        .unwrap();
    let tenants = Tenants::open(&rt).await.unwrap();
    let (tx, mut began) = mpsc::unbounded_channel();
    let mut tools = ToolRegistry::new();
    tools.register(Noop { began: tx }).unwrap();
    let calls = ToolCalls::open(
        &rt,
        tenants.clone(),
        Arc::new(tools),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let projects = Projects::open(
        &rt,
        ProjectDeps {
            tenants: tenants.clone(),
            tool_calls: calls.clone(),
            generators: BTreeMap::new(),
        },
        ProjectOptions {
            tenant_parallelism: 256,
            ..ProjectOptions::default()
        },
    )
    .await
    .unwrap();
    tenants
        .create("acme", TenantSettings::default())
        .await
        .unwrap();
    let mut c = Constitution::default_for_tenant();
    c.version = 2;
    c.data["tools"]["allowed"] = json!(["bench.noop"]);
    tenants.set_constitution("acme", c).await.unwrap();

    // 1. Start latency.
    let mut accepted = Histogram::<u64>::new(3).unwrap();
    let mut first_run = Histogram::<u64>::new(3).unwrap();
    let n_starts = 300u64;
    for i in 0..n_starts + 20 {
        let plan = Plan::from_json(
            &json!({"tasks": [{"id": "only", "kind": "tool", "tool": "bench.noop", "arguments": {"n": i}}]})
                .to_string(),
        )
        .unwrap();
        let t0 = Instant::now();
        projects
            .start("acme", &format!("p{i}"), "alice", "bench", plan)
            .await
            .unwrap();
        let t_accepted = t0.elapsed();
        let ran = loop {
            let (n, at) = began.recv().await.unwrap();
            if n == i {
                break at;
            }
        };
        if i >= 20 {
            accepted.record(t_accepted.as_nanos() as u64).unwrap();
            first_run.record((ran - t0).as_nanos() as u64).unwrap();
        }
    }
    for i in 0..n_starts + 20 {
        projects.wait_ended("acme", &format!("p{i}")).await.unwrap();
    }
    println!(
        "start -> accepted, durable, first wave dispatched: p50 {:.3} ms  p99 {:.3} ms",
        ms(accepted.value_at_quantile(0.5)),
        ms(accepted.value_at_quantile(0.99))
    );
    println!(
        "start -> first task's tool running:               p50 {:.3} ms  p99 {:.3} ms",
        ms(first_run.value_at_quantile(0.5)),
        ms(first_run.value_at_quantile(0.99))
    );
    println!(
        "ratio to the 1 ms target (p50 accepted): {:.2}x under; to Temporal's ~100 ms: {:.0}x; to the replaced platform's 230 ms: {:.0}x",
        1.0 / ms(accepted.value_at_quantile(0.5)),
        100.0 / ms(accepted.value_at_quantile(0.5)),
        230.0 / ms(accepted.value_at_quantile(0.5))
    );

    // 2. A 10,000-task DAG against the same tool calls made directly.
    let n = 10_000usize;
    let mut rng = fastrand::Rng::with_seed(8);
    let tasks: Vec<Value> = (0..n)
        .map(|i| {
            let mut d = BTreeSet::new();
            if i > 0 {
                for _ in 0..rng.usize(0..=3) {
                    d.insert(rng.usize(i.saturating_sub(50)..i));
                }
            }
            let deps: Vec<String> = d.iter().map(|j| format!("t{j}")).collect();
            json!({"id": format!("t{i}"), "kind": "tool", "tool": "bench.noop",
                   "arguments": {"n": 1_000_000 + i}, "depends_on": deps})
        })
        .collect();
    let plan = Plan::from_json(&json!({"tasks": tasks, "max_parallel": 256}).to_string()).unwrap();
    while began.try_recv().is_ok() {}

    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let calls = calls.clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        joins.push(tokio::spawn(async move {
            let _permit = permit;
            let req = CallRequest {
                tool: "bench.noop".into(),
                arguments: json!({"n": 2_000_000 + i}).to_string(),
                principal: Principal {
                    kind: PrincipalKind::User,
                    id: "alice".into(),
                    roles: vec![],
                },
                session: None,
            };
            calls
                .call("acme", &format!("direct-{i}"), req)
                .await
                .unwrap();
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let direct = t0.elapsed();

    let t0 = Instant::now();
    projects
        .start("acme", "dag", "alice", "bench", plan)
        .await
        .unwrap();
    let info = projects.wait_ended("acme", "dag").await.unwrap();
    let dag = t0.elapsed();
    assert_eq!(info.status, ProjectStatus::Succeeded);
    assert_eq!(info.done as usize, n);
    while began.try_recv().is_ok() {}

    println!(
        "{n} direct tool calls, 256 at once:            {:.2} s ({:.0} calls/s)",
        direct.as_secs_f64(),
        n as f64 / direct.as_secs_f64()
    );
    println!(
        "{n}-task DAG, 256 at once, same tool calls:    {:.2} s ({:.0} tasks/s)",
        dag.as_secs_f64(),
        n as f64 / dag.as_secs_f64()
    );
    let overhead = dag.saturating_sub(direct);
    println!(
        "scheduler overhead (DAG - direct): {:.2} s; target < 1 s: {}; DAG / direct: {:.2}x",
        overhead.as_secs_f64(),
        if overhead < Duration::from_secs(1) {
            "met"
        } else {
            "missed"
        },
        dag.as_secs_f64() / direct.as_secs_f64()
    );
    projects.shutdown().await;
    rt.shutdown().await.unwrap();
}
