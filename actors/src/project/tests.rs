//! The plan's validation and the project's state machine, driven without a runtime: random
//! DAGs under random completions, failures, retries and decisions (a property test), and the
//! cases one by one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::machine::{Decided, Effect, Machine, Phase, ProjectState, ProjectStatus, RunOutcome};
use super::plan::{Checked, Plan, TaskKind, TaskRetry, TaskSpec};
use crate::error::Error;
use crate::tools::{Invocation, Tool, ToolError, ToolRegistry};

struct Noop;

#[async_trait]
impl Tool for Noop {
    fn name(&self) -> &str {
        "noop"
    }
    fn description(&self) -> &str {
        "Does nothing."
    }
    fn parameters(&self) -> Value {
        json!({"type": "object"})
    }
    async fn run(&self, _call: &Invocation) -> Result<Value, ToolError> {
        Ok(json!({}))
    }
}

fn tools() -> ToolRegistry {
    let mut t = ToolRegistry::new();
    t.register(Noop).unwrap();
    t
}

fn tool_task(id: &str, deps: &[&str]) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        kind: TaskKind::Tool,
        prompt: None,
        model: None,
        system_prompt: None,
        max_tokens: None,
        tool: Some("noop".into()),
        arguments: Some(json!({})),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        retry: TaskRetry::default(),
        timeout_ms: None,
        approval: false,
        compensation: None,
    }
}

fn plan(tasks: Vec<TaskSpec>, max_parallel: u32) -> Checked {
    Plan {
        tasks,
        max_parallel: Some(max_parallel),
    }
    .check(&tools())
    .unwrap()
}

fn reason(e: Error) -> String {
    match e {
        Error::InvalidPlan { task, reason } => format!("{task:?}: {reason}"),
        other => panic!("not a plan error: {other}"),
    }
}

#[test]
fn a_cycle_is_named() {
    let p = Plan {
        tasks: vec![
            tool_task("a", &[]),
            tool_task("b", &["a", "d"]),
            tool_task("c", &["b"]),
            tool_task("d", &["c"]),
        ],
        max_parallel: None,
    };
    let r = reason(p.check(&tools()).unwrap_err());
    assert!(r.contains("cycle"), "{r}");
    // The cycle b -> c -> d -> b, in some rotation, and nothing else.
    let named: BTreeSet<&str> = r.rsplit(": ").next().unwrap().split(" -> ").collect();
    assert_eq!(named, BTreeSet::from(["b", "c", "d"]), "{r}");
}

#[test]
fn plans_that_cannot_run_are_refused_naming_the_task() {
    let t = tools();
    let check = |tasks: Vec<TaskSpec>| {
        reason(
            Plan {
                tasks,
                max_parallel: None,
            }
            .check(&t)
            .unwrap_err(),
        )
    };
    assert!(check(vec![]).contains("no tasks"));
    let r = check(vec![tool_task("a", &["zz"])]);
    assert!(
        r.contains("\"a\"") && r.contains("unknown task \"zz\""),
        "{r}"
    );
    let mut bad_tool = tool_task("a", &[]);
    bad_tool.tool = Some("nope".into());
    assert!(check(vec![bad_tool]).contains("unknown tool \"nope\""));
    let mut refs = tool_task("b", &[]);
    refs.arguments = Some(json!({"x": "{{tasks.a.output}}"}));
    let r = check(vec![tool_task("a", &[]), refs]);
    assert!(r.contains("does not depend on"), "{r}");
    let r = check(vec![tool_task("a", &[]), tool_task("a", &[])]);
    assert!(r.contains("used by another task"), "{r}");
    let mut agent = tool_task("a", &[]);
    agent.kind = TaskKind::Agent;
    assert!(check(vec![agent]).contains("needs a prompt"));
    let many: Vec<TaskSpec> = (0..=super::MAX_TASKS)
        .map(|i| tool_task(&format!("t{i}"), &[]))
        .collect();
    assert!(check(many).contains("over the limit"));
    let mut typo = tool_task("b", &["a"]);
    typo.arguments = Some(json!({"x": "{{task.a.output}}"}));
    assert!(check(vec![tool_task("a", &[]), typo]).contains("not a reference"));
}

#[test]
fn references_reach_ancestors_and_their_fields() {
    let mut c = tool_task("c", &["b"]);
    c.arguments = Some(json!({"whole": "{{tasks.a.output}}", "text": "n={{tasks.a.output.n}}!"}));
    let checked = plan(vec![tool_task("a", &[]), tool_task("b", &["a"]), c], 2);
    let outputs = BTreeMap::from([("a".to_string(), json!({"n": 3}))]);
    let r = super::plan::Resolver {
        goal: "g",
        outputs: &outputs,
    };
    let args = r
        .json(checked.plan.tasks[2].arguments.as_ref().unwrap())
        .unwrap();
    assert_eq!(args, json!({"whole": {"n": 3}, "text": "n=3!"}));
}

/// Drives a machine, checking after every step what must always hold.
struct Sim {
    s: ProjectState,
    plan: Checked,
    now: u64,
    /// Runs dispatched and not reported.
    runs: BTreeMap<u32, u32>,
    retries: BTreeSet<u32>,
    compensating: Option<u32>,
    compensated: Vec<u32>,
    completed: Vec<u32>,
    dispatches: BTreeMap<u32, u32>,
}

impl Sim {
    fn new(plan: Checked) -> Self {
        let mut sim = Self {
            s: ProjectState::default(),
            plan,
            now: 0,
            runs: BTreeMap::new(),
            retries: BTreeSet::new(),
            compensating: None,
            compensated: Vec::new(),
            completed: Vec::new(),
            dispatches: BTreeMap::new(),
        };
        let fx = sim.machine().start("goal".into(), "u".into());
        sim.apply(fx);
        sim
    }

    fn machine(&mut self) -> Machine<'_> {
        self.now += 1;
        Machine {
            s: &mut self.s,
            plan: &self.plan,
            now_ms: self.now,
            emitted: Vec::new(),
        }
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Run { task, attempt, .. } => {
                    for &d in &self.plan.deps[task as usize] {
                        assert_eq!(
                            self.s.tasks[d as usize].phase,
                            Phase::Done,
                            "task {task} started before {d}"
                        );
                    }
                    assert!(
                        self.runs.insert(task, attempt).is_none(),
                        "task {task} runs twice at once"
                    );
                    *self.dispatches.entry(task).or_default() += 1;
                }
                Effect::Cancel { task } => {
                    assert!(self.runs.contains_key(&task) || !self.s.running.contains_key(&task))
                }
                Effect::Compensate { task } => {
                    assert!(
                        self.compensating.replace(task).is_none(),
                        "two compensations at once"
                    );
                    assert!(self.runs.is_empty(), "a compensation while tasks run");
                }
                Effect::RetryAfter { task, .. } => {
                    self.retries.insert(task);
                }
                Effect::TimeoutAfter { .. } | Effect::RejectCall { .. } => {}
            }
        }
        let running = self.s.running.len() as u32;
        assert!(
            running <= self.plan.max_parallel,
            "{running} run, limit {}",
            self.plan.max_parallel
        );
        for (&t, &a) in &self.s.running {
            assert_eq!(self.s.tasks[t as usize].phase, Phase::Running);
            assert_eq!(
                self.runs.get(&t),
                Some(&a),
                "the state runs {t} but no runner does"
            );
        }
    }

    fn report(&mut self, task: u32, outcome: RunOutcome) {
        let attempt = self.runs.remove(&task).unwrap();
        if matches!(outcome, RunOutcome::Done { .. }) {
            self.completed.push(task);
        }
        let fx = self.machine().ran(task, attempt, outcome);
        self.apply(fx);
    }
}

#[derive(Debug, Clone)]
struct Dag {
    deps: Vec<Vec<usize>>,
    max_parallel: u32,
    approval: Vec<bool>,
    retries: Vec<u32>,
    compensate: Vec<bool>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (1usize..40, 1u32..6).prop_flat_map(|(n, max_parallel)| {
        let deps = (0..n)
            .map(|i| {
                proptest::collection::vec(0..i.max(1), 0..3.min(i + 1)).prop_map(move |v| {
                    let mut v: Vec<usize> = v.into_iter().filter(|&d| d < i).collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                })
            })
            .collect::<Vec<_>>();
        (
            deps,
            Just(max_parallel),
            proptest::collection::vec(proptest::bool::weighted(0.1), n),
            proptest::collection::vec(1u32..4, n),
            proptest::collection::vec(proptest::bool::weighted(0.3), n),
        )
            .prop_map(|(deps, max_parallel, approval, retries, compensate)| Dag {
                deps,
                max_parallel,
                approval,
                retries,
                compensate,
            })
    })
}

fn build(d: &Dag) -> Checked {
    let tasks = (0..d.deps.len())
        .map(|i| {
            let deps: Vec<String> = d.deps[i].iter().map(|j| format!("t{j}")).collect();
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            let mut t = tool_task(&format!("t{i}"), &deps);
            t.approval = d.approval[i];
            t.retry = TaskRetry {
                max_attempts: d.retries[i],
                backoff_ms: 10,
            };
            if d.compensate[i] {
                t.compensation = Some(super::plan::Compensation {
                    tool: "noop".into(),
                    arguments: json!({}),
                });
            }
            t
        })
        .collect();
    plan(tasks, d.max_parallel)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// No task before its dependencies, never more than the limit at once, never one task
    /// twice at once; the project always ends: succeeded with every task done once, or failed
    /// with the compensations of the completed tasks run in reverse completion order.
    #[test]
    fn waves_keep_order_and_limits_and_always_end(d in dag(), choices in proptest::collection::vec(0u32..100, 2000), fail_rate in 0u32..15) {
        let mut sim = Sim::new(build(&d));
        let mut picks = choices.into_iter().cycle();
        for _ in 0..100_000 {
            if sim.s.status.as_ref().is_some_and(ProjectStatus::is_final) {
                break;
            }
            let pick = picks.next().unwrap();
            if let Some(task) = sim.compensating.take() {
                sim.compensated.push(task);
                let fx = sim.machine().compensated(task, None);
                sim.apply(fx);
                continue;
            }
            let gated: Vec<u32> = sim.s.gates.keys().copied().collect();
            let running: Vec<u32> = sim.runs.keys().copied().collect();
            let retrying: Vec<u32> = sim.retries.iter().copied().collect();
            let mut options = running.len() + gated.len() + retrying.len();
            prop_assert!(options > 0, "stuck: {:?}", sim.s.status);
            let which = pick as usize % options;
            if which < running.len() {
                let t = running[which];
                let outcome = if pick % 100 < fail_rate {
                    RunOutcome::Failed { error: "boom".into(), retryable: pick % 2 == 0 }
                } else {
                    RunOutcome::Done { output: "{}".into() }
                };
                sim.report(t, outcome);
            } else if which < running.len() + gated.len() {
                let t = gated[which - running.len()];
                let decided = Decided { approved: pick % 50 != 0, by: "h".into(), comment: String::new(), at_ms: 0 };
                let fx = sim.machine().decide(t, decided).unwrap();
                sim.apply(fx);
            } else {
                let t = retrying[which - running.len() - gated.len()];
                sim.retries.remove(&t);
                let fx = sim.machine().retry_due(t);
                sim.apply(fx);
            }
            options = 0;
            let _ = options;
        }
        match sim.s.status.clone().unwrap() {
            ProjectStatus::Succeeded => {
                prop_assert!(sim.s.tasks.iter().all(|t| t.phase == Phase::Done));
                prop_assert_eq!(sim.completed.len(), d.deps.len());
                for (t, n) in &sim.dispatches {
                    prop_assert_eq!(*n, sim.s.tasks[*t as usize].attempts);
                }
            }
            ProjectStatus::Failed { .. } => {
                let mut want: Vec<u32> = sim.completed.iter().copied().filter(|&t| d.compensate[t as usize]).collect();
                want.reverse();
                prop_assert_eq!(&sim.compensated, &want);
            }
            other => prop_assert!(false, "ended {:?}", other),
        }
    }
}

#[test]
fn a_kill_cancels_what_runs_and_starts_nothing() {
    let mut sim = Sim::new(plan(
        vec![
            tool_task("a", &[]),
            tool_task("b", &[]),
            tool_task("c", &["a"]),
        ],
        2,
    ));
    assert_eq!(sim.runs.len(), 2);
    let fx = sim.machine().kill("ops".into(), "runaway".into()).unwrap();
    assert_eq!(fx.len(), 2);
    assert!(fx.iter().all(|e| matches!(e, Effect::Cancel { .. })));
    // The cancelled runs report; nothing starts.
    for (t, a) in std::mem::take(&mut sim.runs) {
        let fx = sim.machine().ran(
            t,
            a,
            RunOutcome::Done {
                output: "{}".into(),
            },
        );
        assert!(fx.is_empty());
    }
    assert!(matches!(sim.s.status, Some(ProjectStatus::Killed { .. })));
    assert_eq!(sim.s.tasks[2].phase, Phase::Cancelled);
    assert!(sim.machine().kill("ops".into(), "again".into()).is_err());
}

#[test]
fn a_timeout_fails_the_run_and_a_late_report_is_ignored() {
    let mut t = tool_task("a", &[]);
    t.timeout_ms = Some(50);
    t.retry = TaskRetry {
        max_attempts: 2,
        backoff_ms: 5,
    };
    let mut sim = Sim::new(plan(vec![t], 1));
    let fx = sim.machine().timed_out(0, 1);
    assert!(fx.contains(&Effect::Cancel { task: 0 }));
    assert!(fx.contains(&Effect::RetryAfter {
        task: 0,
        after_ms: 5
    }));
    let fx = sim.machine().ran(
        0,
        1,
        RunOutcome::Done {
            output: "{}".into(),
        },
    );
    assert!(
        fx.is_empty(),
        "the late report of attempt 1 counts for nothing"
    );
    assert_eq!(sim.s.tasks[0].phase, Phase::Retrying);
    let fx = sim.machine().retry_due(0);
    assert!(fx.contains(&Effect::Run {
        task: 0,
        attempt: 2,
        resumed: false
    }));
}
