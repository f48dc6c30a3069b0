//! P15: constitution decisions per second and latency on the default constitution, compiled
//! once (soma) against regorus evaluating the same policy and input without caching (a
//! fresh engine per decision: parse, compile, evaluate), side by side in one run.
//!
//! `cargo bench -p soma-actors --bench p15_constitution`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use serde_json::json;
use soma_actors::{
    Action, Compiled, Constitution, DEFAULT_DATA, DEFAULT_POLICY, DecisionInput, Principal,
    PrincipalKind,
};

fn inputs() -> Vec<DecisionInput> {
    let tools = [
        "memory.recall",
        "http.request",
        "shell.exec",
        "memory.remember",
    ];
    (0..64)
        .map(|i| DecisionInput {
            tenant: "acme".into(),
            principal: Principal {
                kind: PrincipalKind::Agent,
                id: format!("agent-{i}"),
                roles: vec![],
            },
            actor: format!("session/{i}"),
            action: if i % 2 == 0 {
                Action::ToolCall
            } else {
                Action::ModelGenerate
            },
            resource: json!({"tool": tools[i % 4], "model": "SmolLM2-135M-Instruct"}),
            context: json!({"tokens_today": i * 100, "budget_left": 10.0, "now_ms": 0}),
        })
        .collect()
}

fn run(name: &str, n: usize, mut f: impl FnMut(usize)) -> (f64, u64, u64) {
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..n.min(200) {
        f(i); // warm-up
    }
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i);
        h.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let (p50, p99) = (h.value_at_quantile(0.5), h.value_at_quantile(0.99));
    println!(
        "{name:<44} {rate:>10.0} decisions/s   p50 {:>7.1} us   p99 {:>7.1} us",
        p50 as f64 / 1e3,
        p99 as f64 / 1e3
    );
    (rate, p50, p99)
}

fn main() {
    println!("P15 constitution decisions (default constitution, one thread)");
    let c = Constitution::default_for_tenant();
    let compiled = Compiled::compile(&c).unwrap();
    let inputs = inputs();
    let (soma_rate, _, soma_p99) = run("soma (compiled once per hash)", 50_000, |i| {
        std::hint::black_box(compiled.decide(&inputs[i % inputs.len()]).unwrap());
    });
    let prelude = include_str!("../src/constitution/prelude.rego");
    let jsons: Vec<String> = inputs
        .iter()
        .map(|i| serde_json::to_string(i).unwrap())
        .collect();
    let (raw_rate, _, raw_p99) = run("regorus, a fresh engine per decision", 2_000, |i| {
        let mut e = regorus::Engine::new();
        e.add_policy("c.rego".into(), DEFAULT_POLICY.into())
            .unwrap();
        e.add_policy("p.rego".into(), prelude.into()).unwrap();
        e.add_data(regorus::Value::from_json_str(DEFAULT_DATA).unwrap())
            .unwrap();
        e.set_input_json(&jsons[i % jsons.len()]).unwrap();
        std::hint::black_box(e.eval_rule("data.soma.decide.result".into()).unwrap());
    });
    println!(
        "ratio soma / uncached regorus: {:.1}x decisions/s; p99 {:.1} us (target < 50 us), {:.0} decisions/s on one core (target >= 20k): {}",
        soma_rate / raw_rate,
        soma_p99 as f64 / 1e3,
        soma_rate,
        if soma_p99 < 50_000 && soma_rate >= 20_000.0 {
            "met"
        } else {
            "missed"
        }
    );
    let _ = raw_p99;
    tool_call_overhead();
}

/// A no-op tool.
struct Noop;

#[async_trait::async_trait]
impl soma_actors::Tool for Noop {
    fn name(&self) -> &str {
        "memory.recall"
    }
    fn description(&self) -> &str {
        "does nothing"
    }
    fn parameters(&self) -> serde_json::Value {
        json!({"type": "object"})
    }
    async fn run(
        &self,
        _call: &soma_actors::Invocation,
    ) -> Result<serde_json::Value, soma_actors::ToolError> {
        Ok(json!({}))
    }
}

/// The share of a tool call (durable: journaled request, decision, run, flushed outcome)
/// that its decision takes.
fn tool_call_overhead() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let runtime =
            soma_supervision::Runtime::open(soma_supervision::RuntimeOptions::new(dir.path()))
                .await
                .unwrap();
        let tenants = soma_actors::Tenants::open(&runtime).await.unwrap();
        tenants
            .create("acme", soma_actors::TenantSettings::default())
            .await
            .unwrap();
        let mut tools = soma_actors::ToolRegistry::new();
        tools.register(Noop).unwrap();
        let calls = soma_actors::ToolCalls::open(
            &runtime,
            tenants.clone(),
            std::sync::Arc::new(tools),
            soma_actors::RetryPolicy::default(),
        )
        .await
        .unwrap();
        let principal = Principal {
            kind: PrincipalKind::Agent,
            id: "agent-1".into(),
            roles: vec![],
        };
        let n = 2_000;
        let mut calls_h = Histogram::<u64>::new(3).unwrap();
        let mut decide_h = Histogram::<u64>::new(3).unwrap();
        for i in 0..n {
            let t = Instant::now();
            let r = calls
                .call(
                    "acme",
                    &format!("c{i}"),
                    soma_actors::CallRequest {
                        tool: "memory.recall".into(),
                        arguments: "{}".into(),
                        principal: principal.clone(),
                        session: None,
                    },
                )
                .await
                .unwrap();
            calls_h.record(t.elapsed().as_nanos() as u64).unwrap();
            assert!(r.outcome().unwrap().is_ok());
            let t = Instant::now();
            std::hint::black_box(
                tenants
                    .decide(
                        "acme",
                        principal.clone(),
                        "tool-call/x",
                        Action::ToolCall,
                        json!({"tool": "memory.recall", "tenant": "acme"}),
                        0,
                    )
                    .await
                    .unwrap(),
            );
            decide_h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
        let (c50, d50) = (
            calls_h.value_at_quantile(0.5) as f64,
            decide_h.value_at_quantile(0.5) as f64,
        );
        println!(
            "tool call (journaled, decided, run, flushed): p50 {:.1} us; its decision (tenant state read + policy): p50 {:.1} us = {:.1} % of the call",
            c50 / 1e3,
            d50 / 1e3,
            100.0 * d50 / c50
        );
        runtime.shutdown().await.unwrap();
    });
    let _ = Duration::ZERO;
}
