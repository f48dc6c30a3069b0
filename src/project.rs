//! `soma project run plan.json`: runs a KAMACHIQ plan on an embedded node (journal under
//! `--data`), with a live view (one progress bar per wave, a wave being the tasks at the same
//! depth of the DAG) and approvals prompted on the terminal. Run again with the same `--id`
//! after a crash or a ctrl-c, it goes on where the project stopped.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use soma_actors::{
    Gate, HttpLimits, HttpRequestTool, Plan, ProjectDeps, ProjectEventKind, ProjectOptions,
    ProjectStatus, Projects, RetryPolicy, TaskKind, TenantSettings, Tenants, ToolCalls,
    ToolRegistry,
};
use soma_inference::{DeviceChoice, GenerationModel, GeneratorOptions, GeneratorPool};

/// What `soma project run` was asked.
pub(crate) struct RunArgs {
    pub(crate) plan: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) models: PathBuf,
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) id: Option<String>,
    pub(crate) goal: Option<String>,
    pub(crate) approve_all: bool,
}

/// The project id from the plan's file name: lowercase, `-` for anything not allowed.
fn id_from(path: &Path) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("project");
    let id: String = stem
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() { "project".into() } else { id }
}

async fn generators(dir: &Path) -> anyhow::Result<BTreeMap<String, Arc<GeneratorPool>>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    dirs.sort();
    for d in dirs.into_iter().filter(|p| p.is_dir()) {
        let Some(id) = d.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let gguf = std::fs::read_dir(&d)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "gguf"));
        if let Some(file) = gguf {
            let model = tokio::task::spawn_blocking(move || {
                GenerationModel::load(
                    &file,
                    &DeviceChoice::Cpu.device()?,
                    &GeneratorOptions::default(),
                )
            })
            .await??;
            let pool = GeneratorPool::start(model, Default::default()).await?;
            out.insert(id, Arc::new(pool));
        }
    }
    Ok(out)
}

/// Per task, its wave: 0 for a task without dependencies, else one more than its deepest.
fn waves(plan: &Plan) -> Vec<usize> {
    let index: BTreeMap<&str, usize> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    let mut wave: Vec<Option<usize>> = vec![None; plan.tasks.len()];
    fn depth(
        i: usize,
        plan: &Plan,
        index: &BTreeMap<&str, usize>,
        wave: &mut Vec<Option<usize>>,
    ) -> usize {
        if let Some(w) = wave[i] {
            return w;
        }
        // The plan is checked acyclic before this is called.
        let mut w = 0;
        for d in &plan.tasks[i].depends_on {
            if let Some(&j) = index.get(d.as_str()) {
                w = w.max(depth(j, plan, index, wave) + 1);
            }
        }
        wave[i] = Some(w);
        w
    }
    (0..plan.tasks.len())
        .map(|i| depth(i, plan, &index, &mut wave))
        .collect()
}

/// Asks on the terminal whether to approve `task`; stdin closed is a rejection.
fn ask(bars: &MultiProgress, task: &str, why: &str) -> (bool, String) {
    bars.suspend(|| {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "task {task} waits for an approval ({why}). approve? [y/N] "
        );
        let _ = err.flush();
        let mut line = String::new();
        match std::io::stdin().lock().read_line(&mut line) {
            Ok(0) | Err(_) => (false, "no answer (stdin closed)".into()),
            Ok(_) => {
                let yes = matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes");
                (yes, "decided on the terminal".into())
            }
        }
    })
}

/// Runs the plan (or goes on with the project of that id) until it ends.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ProjectStatus> {
    let text = std::fs::read_to_string(&args.plan)
        .with_context(|| format!("reading the plan {}", args.plan.display()))?;
    let plan = Plan::from_json(&text).with_context(|| args.plan.display().to_string())?;
    // The waves below need a plan without cycles; the tools are checked at the start.
    plan.clone()
        .compile()
        .with_context(|| args.plan.display().to_string())?;
    let id = args.id.clone().unwrap_or_else(|| id_from(&args.plan));
    std::fs::create_dir_all(&args.data).with_context(|| format!("data {}", args.data.display()))?;
    let rt = soma_supervision::Runtime::open(soma_supervision::RuntimeOptions::new(
        args.data.join("journal"),
    ))
    .await?;
    let tenants = Tenants::open(&rt).await?;
    if tenants.get(&args.tenant).await.is_err() {
        tenants
            .create(&args.tenant, TenantSettings::default())
            .await?;
    }
    let mut tools = ToolRegistry::new();
    tools.register(HttpRequestTool::new(
        tenants.clone(),
        HttpLimits::default(),
    )?)?;
    let calls = ToolCalls::open(
        &rt,
        tenants.clone(),
        Arc::new(tools),
        RetryPolicy::default(),
    )
    .await?;
    let generators = if plan.tasks.iter().any(|t| t.kind == TaskKind::Agent) {
        generators(&args.models).await?
    } else {
        BTreeMap::new()
    };
    let projects = Projects::open(
        &rt,
        ProjectDeps {
            tenants: tenants.clone(),
            tool_calls: calls,
            generators,
        },
        ProjectOptions::default(),
    )
    .await?;
    let wave = waves(&plan);
    let goal = args
        .goal
        .clone()
        .unwrap_or_else(|| format!("run {}", args.plan.display()));
    let tenant = args.tenant.as_str();
    let info = match projects.status(tenant, &id).await {
        Ok(info) => {
            eprintln!(
                "project {id} exists ({}): going on with it",
                info.status.name()
            );
            info
        }
        Err(soma_actors::Error::NotFound { .. }) => {
            projects
                .start(tenant, &id, &args.user, &goal, plan.clone())
                .await?
        }
        Err(e) => return Err(e.into()),
    };
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("wave {prefix:>3} [{bar:30}] {pos}/{len} {msg}")
        .map_err(|e| anyhow::anyhow!("progress style: {e}"))?
        .progress_chars("=> ");
    let n_waves = wave.iter().max().map_or(0, |w| w + 1);
    let per_wave: Vec<ProgressBar> = (0..n_waves)
        .map(|w| {
            let len = wave.iter().filter(|&&x| x == w).count() as u64;
            let bar = bars.add(ProgressBar::new(len));
            bar.set_style(style.clone());
            bar.set_prefix(w.to_string());
            bar
        })
        .collect();
    let index: BTreeMap<String, usize> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.clone(), i))
        .collect();
    for t in &info.tasks {
        if t.phase == soma_actors::Phase::Done
            && let Some(&i) = index.get(&t.id)
        {
            per_wave[wave[i]].inc(1);
        }
    }
    // Gates open before this start are asked about first.
    let mut pending: Vec<(String, String)> = info
        .tasks
        .iter()
        .filter_map(|t| t.gate.as_ref().map(|g| (t.id.clone(), gate_text(g))))
        .collect();
    let mut sub = projects.subscribe(tenant, &id, info.last_event + 1).await?;
    loop {
        for (task, why) in pending.drain(..) {
            let (yes, comment) = if args.approve_all {
                (true, "approved by --approve-all".to_string())
            } else {
                let b = bars.clone();
                let t = task.clone();
                tokio::task::spawn_blocking(move || ask(&b, &t, &why)).await?
            };
            let r = if yes {
                projects
                    .approve(tenant, &id, &task, &args.user, &comment)
                    .await
            } else {
                projects
                    .reject(tenant, &id, &task, &args.user, &comment)
                    .await
            };
            if let Err(e) = r {
                bars.println(format!("deciding {task}: {e}"))?;
            }
        }
        let status = projects.status(tenant, &id).await?.status;
        if status.is_final() {
            for b in &per_wave {
                b.finish();
            }
            projects.shutdown().await;
            rt.shutdown().await?;
            return Ok(status);
        }
        let event = match sub.next().await {
            Some(Ok(e)) => e,
            Some(Err(soma_actors::Error::Lagged { resume_from, .. })) => {
                sub = projects.subscribe(tenant, &id, resume_from).await?;
                continue;
            }
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the project's events ended"),
        };
        match &event.kind {
            ProjectEventKind::TaskDone { task } => {
                if let Some(&i) = index.get(task) {
                    per_wave[wave[i]].inc(1);
                    per_wave[wave[i]].set_message(format!("{task} done"));
                }
            }
            ProjectEventKind::TaskStarted { task, attempt } => {
                if let Some(&i) = index.get(task) {
                    per_wave[wave[i]].set_message(format!("{task} running (run {attempt})"));
                }
            }
            ProjectEventKind::TaskFailed {
                task,
                attempt,
                error,
                retry_in_ms,
            } => {
                let again =
                    retry_in_ms.map_or("no retry".to_string(), |ms| format!("retry in {ms} ms"));
                bars.println(format!("{task}: run {attempt} failed: {error} ({again})"))?;
            }
            ProjectEventKind::TaskAwaiting { task, gate } => {
                pending.push((task.clone(), gate_text(gate)));
            }
            ProjectEventKind::CompensationStarted { task } => {
                bars.println(format!("undoing {task}"))?;
            }
            ProjectEventKind::CompensationEnded {
                task,
                error: Some(e),
            } => {
                bars.println(format!("undoing {task} failed: {e}"))?;
            }
            ProjectEventKind::Failed { task, error } => {
                bars.println(format!("project failed at {task}: {error}"))?;
            }
            ProjectEventKind::Killed { by, reason } => {
                bars.println(format!("project killed by {by}: {reason}"))?;
            }
            _ => {}
        }
    }
}

fn gate_text(g: &Gate) -> String {
    match g {
        Gate::Start { reasons } => reasons.join("; "),
        Gate::Task => "an approval task".into(),
        Gate::ToolCall { call, reasons } => format!("tool call {call}: {}", reasons.join("; ")),
    }
}
