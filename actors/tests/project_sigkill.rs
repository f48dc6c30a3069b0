//! A 200-task random DAG survives 10 SIGKILLs of its process, counted: every task's effect is
//! applied exactly once (the test tool dedupes by the call's idempotency key and records each
//! run in a file, fsynced), never before the effects of its dependencies, and the runs cut by
//! a kill are run again (with the same key) after the restart.
//!
//! The parent runs the child entry point (`child_project_host`, ignored when run alone) as a
//! separate process, kills it with SIGKILL a few tool runs into each start, then lets a last
//! child finish the project and report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use soma_actors::{
    Constitution, Invocation, Phase, Plan, ProjectDeps, ProjectOptions, ProjectStatus, Projects,
    RetryPolicy, TenantSettings, Tenants, Tool, ToolCalls, ToolError, ToolRegistry,
};
use soma_supervision::{Runtime, RuntimeOptions};

const TASKS: usize = 200;
const KILLS: u32 = 10;

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Applies a task's effect once per idempotency key: `APPLY key task` the first time,
/// `DUP key task` after; `BEGIN key task` before, each line fsynced.
struct Effect {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl Effect {
    fn append(&self, line: String) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
        f.sync_data().unwrap();
    }
}

#[async_trait]
impl Tool for Effect {
    fn name(&self) -> &str {
        "test.effect"
    }
    fn description(&self) -> &str {
        "Applies a task's effect."
    }
    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"task": {"type": "string", "maxLength": 16}},
            "required": ["task"],
            "additionalProperties": false,
        })
    }
    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let task = call.arguments["task"].as_str().unwrap_or("?").to_string();
        let key = &call.idempotency_key;
        self.append(format!("BEGIN {key} {task}\n"));
        out(format!("RUNNING {key}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The dedupe of the key and the effect, as one step of this process.
        let _one = self.lock.lock().await;
        let log = std::fs::read_to_string(&self.path).unwrap_or_default();
        let applied = log.lines().any(|l| l.starts_with(&format!("APPLY {key} ")));
        if applied {
            self.append(format!("DUP {key} {task}\n"));
        } else {
            self.append(format!("APPLY {key} {task}\n"));
        }
        Ok(json!({"task": task}))
    }
}

async fn host(dir: PathBuf) {
    let rt = Runtime::open(RuntimeOptions::new(dir.join("journal")))
        .await
        .unwrap();
    let tenants = Tenants::open(&rt).await.unwrap();
    let mut tools = ToolRegistry::new();
    tools
        .register(Effect {
            path: dir.join("effects.log"),
            lock: tokio::sync::Mutex::new(()),
        })
        .unwrap();
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
            tool_calls: calls,
            generators: BTreeMap::new(),
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
        let mut c = Constitution::default_for_tenant();
        c.version = 2;
        c.data["tools"]["allowed"] = json!(["test.effect"]);
        tenants.set_constitution("acme", c).await.unwrap();
    }
    if projects.status("acme", "dag").await.is_err() {
        let plan =
            Plan::from_json(&std::fs::read_to_string(dir.join("plan.json")).unwrap()).unwrap();
        projects
            .start("acme", "dag", "alice", "apply every effect", plan)
            .await
            .unwrap();
        out("STARTED".into());
    }
    let at = projects.status("acme", "dag").await.unwrap();
    let running: Vec<&str> = at
        .tasks
        .iter()
        .filter(|t| t.phase == Phase::Running)
        .map(|t| t.id.as_str())
        .collect();
    eprintln!(
        "child: project {} with {} of {TASKS} done, running {running:?}",
        at.status.name(),
        at.done
    );
    let info = projects.wait_ended("acme", "dag").await.unwrap();
    let attempts: Vec<u32> = info.tasks.iter().map(|t| t.attempts).collect();
    let done = info.tasks.iter().filter(|t| t.phase == Phase::Done).count();
    out(format!(
        "ENDED {} done={done} max_attempts={}",
        info.status.name(),
        attempts.iter().max().unwrap_or(&0)
    ));
    assert_eq!(info.status, ProjectStatus::Succeeded);
    projects.shutdown().await;
    rt.shutdown().await.unwrap();
}

#[test]
#[ignore = "child process of the SIGKILL test; its parent runs it by name"]
fn child_project_host() {
    let dir = PathBuf::from(std::env::var("SOMA_TEST_DIR").expect("run by its parent"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(host(dir));
}

fn spawn(dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_project_host", "--nocapture"])
        .env("SOMA_TEST_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A random DAG: each task depends on up to 3 of the 30 tasks before it.
fn random_plan(seed: u64) -> (Value, Vec<Vec<usize>>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut deps = Vec::new();
    let tasks: Vec<Value> = (0..TASKS)
        .map(|i| {
            let mut d: BTreeSet<usize> = BTreeSet::new();
            if i > 0 {
                for _ in 0..rng.usize(0..=3) {
                    d.insert(rng.usize(i.saturating_sub(30)..i));
                }
            }
            let names: Vec<String> = d.iter().map(|j| format!("t{j}")).collect();
            deps.push(d.into_iter().collect());
            json!({
                "id": format!("t{i}"),
                "kind": "tool",
                "tool": "test.effect",
                "arguments": {"task": format!("t{i}")},
                "depends_on": names,
            })
        })
        .collect();
    (json!({"tasks": tasks, "max_parallel": 6}), deps)
}

#[test]
fn a_random_dag_survives_ten_sigkills_with_every_effect_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    let (plan, deps) = random_plan(seed);
    std::fs::write(dir.path().join("plan.json"), plan.to_string()).unwrap();

    for round in 1..=KILLS {
        let mut child = spawn(dir.path());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // A few runs into this start, then a random moment within a run (each takes 20 ms).
        let runs_before_kill = 3 + fastrand::usize(0..10);
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("the child of round {round} stopped talking"));
            assert!(
                !line.starts_with("ENDED"),
                "the project ended before kill {round}: {line}"
            );
            if line.starts_with("RUNNING ") {
                seen += 1;
                if seen >= runs_before_kill {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "round {round} ran nothing");
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..25)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
    }

    // The last start finishes the project.
    let last = spawn(dir.path());
    let output = last.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the last child failed: {report}");
    let ended = report
        .lines()
        .find(|l| l.starts_with("ENDED"))
        .expect("an end report");
    assert_eq!(
        ended,
        format!("ENDED succeeded done={TASKS} max_attempts=1"),
        "every task done, none started a second attempt"
    );

    // The effects, as the tool recorded them.
    let log = std::fs::read_to_string(dir.path().join("effects.log")).unwrap();
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    let mut begins: BTreeMap<String, usize> = BTreeMap::new();
    let mut dups = 0;
    for (at, line) in log.lines().enumerate() {
        let mut w = line.split(' ');
        match (w.next(), w.next(), w.next()) {
            (Some("APPLY"), Some(_), Some(task)) => {
                assert!(
                    applied.insert(task.to_string(), at).is_none(),
                    "the effect of {task} was applied twice"
                );
            }
            (Some("BEGIN"), Some(key), Some(_)) => *begins.entry(key.to_string()).or_default() += 1,
            (Some("DUP"), Some(_), Some(_)) => dups += 1,
            _ => panic!("unexpected line in the effect log: {line}"),
        }
    }
    assert_eq!(applied.len(), TASKS, "every effect applied");
    for (i, d) in deps.iter().enumerate() {
        let me = applied[&format!("t{i}")];
        for j in d {
            assert!(
                applied[&format!("t{j}")] < me,
                "t{i} was applied before its dependency t{j}"
            );
        }
    }
    let retried = begins.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{TASKS} tasks, {KILLS} kills: {retried} runs cut by a kill ran again ({dups} found their effect applied already)"
    );
    assert!(
        retried >= 1,
        "no kill landed inside a run, so nothing shows a cut run being retried"
    );
}
