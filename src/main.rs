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
    /// Hosts durable counters for the demo and the durability tests (driven over stdio).
    #[command(hide = true)]
    DurableHost {
        /// Data directory (journal).
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
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
    Ok(())
}
