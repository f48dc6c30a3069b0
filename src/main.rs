//! The `soma` binary.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
    /// Hosts durable counters for the demo and the durability tests (driven over stdio).
    #[command(hide = true)]
    DurableHost {
        /// Data directory (journal).
        #[arg(long)]
        data: PathBuf,
    },
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
        Command::DurableHost { data } => rt.block_on(soma::demo::host(&data))?,
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
            let report = rt.block_on(soma::demo::run(exe, data.clone(), rounds, keys))?;
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
