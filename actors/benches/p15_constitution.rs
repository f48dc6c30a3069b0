//! P15: constitution decisions per second and latency on the default constitution, compiled
//! once (soma) against regorus evaluating the same policy and input without caching (a
//! fresh engine per decision: parse, compile, evaluate), side by side in one run.
//!
//! `cargo bench -p soma-actors --bench p15_constitution`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
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
    let prelude = "package soma.decide\n\ndeny := sort([r | some r in data.soma.deny])\n\nescalate := sort([r | some r in data.soma.escalate])\n\ndefault allow := false\n\nallow if data.soma.allow == true\n\nresult := {\"deny\": deny, \"escalate\": escalate, \"allow\": allow}\n";
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
    let _ = (raw_p99, Duration::ZERO);
}
