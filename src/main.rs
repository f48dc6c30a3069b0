//! The `soma` binary.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod demo;
mod project;
mod serve;

// mimalloc: the domain's hot paths (policy evaluation above all) allocate and free many small
// values; with glibc's allocator their p99 was 20-30 % higher (docs/benchmarks.md, P15).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "soma",
    version,
    about = "SomaAgent: a runtime for governed, long-running AI-agent work"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one node: journal, models, and the gateway (OpenAI-compatible API) until
    /// SIGTERM or ctrl-c.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Creates, lists, revokes and rotates API keys (works while the node runs).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        /// Data directory (default from the configuration: `data/`).
        #[arg(long, global = true)]
        data: Option<PathBuf>,
        /// Configuration file.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Shows the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Durable-actor demo: feeds counters in a child process, SIGKILLs it mid-work again and
    /// again, restarts it, and proves nothing acknowledged was lost or applied twice.
    Demo {
        /// Data directory (journal); a fresh temporary one if absent.
        #[arg(long, env = "SOMA_DATA")]
        data: Option<PathBuf>,
        /// Crash rounds.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Number of durable counters.
        #[arg(long, default_value_t = 4)]
        keys: usize,
    },
    /// Inspects or repairs a journal directory (operator tools; the runtime never cuts
    /// acknowledged data by itself).
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Runs KAMACHIQ projects (task DAGs) on an embedded node.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Looks at a cluster in its coordination store (Redis).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Hosts durable counters for the demo and the durability tests (driven over stdio).
    #[command(hide = true)]
    DurableHost {
        /// Data directory (journal).
        #[arg(long)]
        data: PathBuf,
    },
}

/// Where the configuration comes from: the file, then `SOMA_*` variables, then these flags.
#[derive(clap::Args)]
struct ConfigArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (journal, API keys) [SOMA_DATA; default data/].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Address to listen on [SOMA_LISTEN; default 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
}

impl ConfigArgs {
    fn load(self) -> anyhow::Result<serve::ServeConfig> {
        Ok(serve::ServeConfig::load(
            self.config.as_deref(),
            std::env::vars(),
            self.data,
            self.listen,
        )?)
    }
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Runs a plan (JSON, docs/plan.schema.json) until the project ends, with a progress bar
    /// per wave and approvals asked on the terminal; run again with the same id to go on
    /// after a crash. Exits 0 only if the project succeeded.
    Run {
        /// The plan file.
        plan: PathBuf,
        /// Data directory (the journal lives under it).
        #[arg(long, env = "SOMA_DATA", default_value = "data")]
        data: PathBuf,
        /// Models directory (agent tasks use its GGUF models).
        #[arg(long, env = "SOMA_MODELS", default_value = "models")]
        models: PathBuf,
        /// The tenant (created with the default constitution if missing).
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Who runs it (the principal of its tasks and approvals).
        #[arg(long, default_value = "cli")]
        user: String,
        /// The project id (default: from the plan's file name).
        #[arg(long)]
        id: Option<String>,
        /// The goal (default: "run <plan file>").
        #[arg(long)]
        goal: Option<String>,
        /// Approves every gate without asking.
        #[arg(long)]
        approve_all: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Prints the members (state, incarnation, lease left, address) and the shards each
    /// live incarnation holds.
    Status {
        /// The coordination store (credentials allowed; never printed).
        #[arg(
            long,
            env = "SOMA_REDIS_URL",
            default_value = "redis://127.0.0.1:6379/"
        )]
        redis: String,
        /// The cluster's name.
        #[arg(long, default_value = "soma")]
        cluster: String,
        /// The number of shards (the journal's ranges).
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hands off every shard of a node, then makes it leave. Not implemented yet.
    Drain {
        /// The node's name.
        node: String,
    },
    /// Makes a node leave without handing off. Not implemented yet.
    Leave {
        /// The node's name.
        node: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Prints the merged configuration (file, environment, flags) as TOML.
    Print {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Creates a key for a tenant and prints it once, alone on the last line.
    Create {
        /// The tenant the key's requests are attributed to.
        #[arg(long)]
        tenant: String,
        /// Lifetime, e.g. `30d`, `12h` (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Lists the keys (never the keys themselves).
    List,
    /// Revokes a key by id.
    Revoke {
        /// The key's id (`key_...`).
        id: String,
    },
    /// Replaces a key by a new one of the same tenant; the old one is revoked.
    Rotate {
        /// The key's id (`key_...`).
        id: String,
    },
}

fn keys_command(
    command: KeysCommand,
    data: Option<PathBuf>,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = ConfigArgs {
        config,
        data,
        listen: None,
    }
    .load()?;
    let store = serve::key_store(&config.data)?;
    let show = |k: &soma_gateway::KeyRecord| {
        let state = if k.revoked {
            "revoked"
        } else if k.expired(now_ms()) {
            "expired"
        } else {
            "active"
        };
        format!(
            "{}  tenant={}  {state}  expires={}",
            k.id,
            k.tenant,
            k.expires_ms.map_or("never".to_string(), |e| {
                use std::fmt::Write as _;
                let mut out = String::new();
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e);
                if write!(out, "{}", humantime::format_rfc3339_seconds(at)).is_err() {
                    out = format!("{e} ms after 1970");
                }
                out
            })
        )
    };
    match command {
        KeysCommand::Create { tenant, expires } => {
            let lifetime = expires
                .map(|e| {
                    humantime::parse_duration(&e)
                        .with_context(|| format!("--expires {e:?}: not a duration like 30d or 12h"))
                })
                .transpose()?;
            let (record, secret) = store.create(&tenant, lifetime)?;
            println!("{}", show(&record));
            println!("{secret}");
        }
        KeysCommand::List => {
            for k in store.list()? {
                println!("{}", show(&k));
            }
        }
        KeysCommand::Revoke { id } => println!("{}", show(&store.revoke(&id)?)),
        KeysCommand::Rotate { id } => {
            let (record, secret) = store.rotate(&id)?;
            println!("{}", show(&record));
            println!("{secret}");
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Reads a journal without changing it: segments, pending messages per key, and every
    /// damage found, with file and offset. Exits with status 1 when something is wrong.
    Check {
        /// The journal directory.
        dir: PathBuf,
    },
    /// Copies everything readable of a journal into a new one and reports what was lost
    /// (also written to NEW/SALVAGE_REPORT). The damaged journal is left as it is.
    Salvage {
        /// The damaged journal directory.
        dir: PathBuf,
        /// Where the new journal goes (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
}

fn journal_command(command: JournalCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        JournalCommand::Check { dir } => {
            let report = soma::supervision::check(&dir)
                .with_context(|| format!("cannot check {}", dir.display()))?;
            print!("{report}");
            Ok(if report.is_healthy() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(1)
            })
        }
        JournalCommand::Salvage { dir, out } => {
            let report = soma::supervision::salvage(&dir, &out)
                .with_context(|| format!("cannot salvage {}", dir.display()))?;
            print!("{report}");
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOMA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    match cli.command {
        Command::Journal { command } => return journal_command(command),
        Command::Serve { config } => {
            let config = config.load()?;
            rt.block_on(serve::serve(config))?;
        }
        Command::Keys {
            command,
            data,
            config,
        } => keys_command(command, data, config)?,
        Command::Config {
            command: ConfigCommand::Print { config },
        } => print!("{}", config.load()?.to_toml()),
        Command::Project {
            command:
                ProjectCommand::Run {
                    plan,
                    data,
                    models,
                    tenant,
                    user,
                    id,
                    goal,
                    approve_all,
                },
        } => {
            let status = rt.block_on(project::run(project::RunArgs {
                plan,
                data,
                models,
                tenant,
                user,
                id,
                goal,
                approve_all,
            }))?;
            println!("project {}", status.name());
            if let soma_actors::ProjectStatus::Failed { task, error } = &status {
                println!("failed at {task}: {error}");
            }
            if status != soma_actors::ProjectStatus::Succeeded {
                std::process::exit(1);
            }
        }
        Command::Cluster { command } => match command {
            ClusterCommand::Status {
                redis,
                cluster,
                shards,
                json,
            } => {
                let status = rt.block_on(soma_cluster::status(&redis, &cluster, shards))?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print!("{status}");
                }
            }
            ClusterCommand::Drain { node } | ClusterCommand::Leave { node } => {
                anyhow::bail!(
                    "not implemented: nodes do not run in a cluster yet (node links, routing and hand-off are to come), so there is nothing to drain or leave on {node}"
                );
            }
        },
        Command::DurableHost { data } => rt.block_on(demo::host(&data))?,
        Command::Demo { data, rounds, keys } => {
            let temporary = data.is_none();
            let data = data.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("soma-demo-{}", std::process::id()))
            });
            let exe = std::env::current_exe().context("cannot find the soma binary")?;
            println!(
                "durable counters in a child process, journal in {}",
                data.display()
            );
            let report = rt.block_on(demo::run(exe, data.clone(), rounds, keys))?;
            println!("{report}");
            if temporary {
                std::fs::remove_dir_all(&data)
                    .with_context(|| format!("cannot remove {}", data.display()))?;
            }
            anyhow::ensure!(report.holds(), "durability invariants violated");
            println!("ok: every acknowledged message applied exactly once");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
