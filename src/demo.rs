//! The durability demo and its test host: a process that hosts durable counters and is fed,
//! SIGKILLed and restarted by a driver, which then proves that nothing acknowledged was lost
//! and nothing was applied twice. `soma demo` runs it; the SIGKILL test uses the same parts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use soma_supervision::{
    Context, DurableActor, HandlerError, RegistryOptions, Runtime, RuntimeOptions,
};

/// Errors of the demo driver and host.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] soma_supervision::Error),
    /// Talking to the host process failed.
    #[error("host process i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The host said something the driver does not understand.
    #[error("unexpected line from host: {0:?}")]
    Protocol(String),
}

/// `Result` of the demo.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// A message to a demo counter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum CounterMsg {
    /// Apply message `id` once.
    Add(u64),
    /// Does nothing; handled after everything sent before it.
    Barrier,
}

/// A demo counter's state: a count and the record of every id applied, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct CounterState {
    /// Messages applied.
    pub(crate) count: u64,
    /// Their ids, in the order applied.
    pub(crate) ids: Vec<u64>,
}

/// The demo's durable actor.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counter;

impl DurableActor for Counter {
    type Msg = CounterMsg;
    type State = CounterState;

    fn init(&self, _key: &str) -> CounterState {
        CounterState::default()
    }

    async fn handle(
        &self,
        _ctx: &mut Context<CounterMsg>,
        state: &mut CounterState,
        msg: CounterMsg,
    ) -> Result<(), HandlerError> {
        if let CounterMsg::Add(id) = msg {
            state.count += 1;
            state.ids.push(id);
        }
        Ok(())
    }
}

/// Runs the host: opens the journal in `data`, prints `ready`, then serves stdin lines
/// `send <key> <id>` (answering `ack <id> <seq>` once durable) and `dump <key>...`
/// (answering `state <key> <count> <ids>` per key, then `done`).
pub(crate) async fn host(data: &Path) -> Result<()> {
    let rt = Runtime::open(RuntimeOptions::new(data.join("journal"))).await?;
    let mut opts = RegistryOptions::new("counter");
    opts.max_in_flight = 100_000;
    let reg = rt.registry(Counter, opts).await?;
    let out = Printer::start();
    out.say("ready\n".into());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("send"), Some(key), Some(id)) => {
                let id: u64 = id.parse().map_err(|_| Error::Protocol(line.clone()))?;
                let (reg, out, key) = (reg.clone(), out.clone(), key.to_string());
                tokio::spawn(async move {
                    match reg.send(&key, &CounterMsg::Add(id)).await {
                        Ok(seq) => out.say(format!("ack {id} {seq}\n")),
                        Err(e) => {
                            tracing::error!(key, id, error = %e, "send failed");
                        }
                    }
                });
            }
            (Some("dump"), ..) => {
                for key in line.split_whitespace().skip(1) {
                    let seq = reg.send(key, &CounterMsg::Barrier).await?;
                    reg.wait_handled(key, seq).await?;
                    let s = reg.state(key).await?;
                    let ids: Vec<String> = s.ids.iter().map(u64::to_string).collect();
                    out.say(format!("state {key} {} {}\n", s.count, ids.join(",")));
                }
                out.say("done\n".into());
            }
            _ => return Err(Error::Protocol(line)),
        }
    }
    // stdin closed: a graceful end (the driver's SIGKILL never gets here).
    rt.shutdown().await?;
    Ok(())
}

/// Writes lines to stdout from one task, flushing once per burst.
#[derive(Clone)]
struct Printer(tokio::sync::mpsc::UnboundedSender<String>);

impl Printer {
    fn start() -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            let mut lines = Vec::new();
            while rx.recv_many(&mut lines, 1024).await > 0 {
                let burst: String = lines.drain(..).collect();
                if out.write_all(burst.as_bytes()).await.is_err() || out.flush().await.is_err() {
                    return;
                }
            }
        });
        Self(tx)
    }

    fn say(&self, line: String) {
        let _ = self.0.send(line);
    }
}

/// A running host process, driven over its stdin and stdout.
#[derive(Debug)]
pub(crate) struct Host {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Host {
    /// Starts `exe durable-host --data <data>` and waits until it is ready.
    pub(crate) async fn spawn(exe: &Path, data: &Path) -> Result<Self> {
        let mut child = tokio::process::Command::new(exe)
            .arg("durable-host")
            .arg("--data")
            .arg(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Protocol("no stdout".into()))?;
        let mut host = Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        match host.lines.next_line().await? {
            Some(l) if l == "ready" => Ok(host),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Kills the host with SIGKILL and reaps it. `false` if it had already exited by
    /// itself (a crash of its own, which the durability checks count as a failure).
    pub(crate) async fn kill(mut self) -> Result<bool> {
        if let Some(status) = self.child.try_wait()? {
            tracing::error!(%status, "host exited before its SIGKILL");
            return Ok(false);
        }
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(true)
    }

    /// Asks for the state of `keys` after everything sent so far was handled.
    pub(crate) async fn dump(
        &mut self,
        keys: &[String],
    ) -> Result<BTreeMap<String, (u64, Vec<u64>)>> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Protocol("stdin closed".into()))?;
        stdin
            .write_all(format!("dump {}\n", keys.join(" ")).as_bytes())
            .await?;
        stdin.flush().await?;
        let mut states = BTreeMap::new();
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .ok_or_else(|| Error::Protocol("host exited during dump".into()))?;
            if line == "done" {
                return Ok(states);
            }
            let mut w = line.splitn(4, ' ');
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("state"), Some(key), Some(count), ids) => {
                    let count = count.parse().map_err(|_| Error::Protocol(line.clone()))?;
                    let ids = ids
                        .unwrap_or("")
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::parse)
                        .collect::<Result<Vec<u64>, _>>()
                        .map_err(|_| Error::Protocol(line.clone()))?;
                    states.insert(key.to_string(), (count, ids));
                }
                (Some("ack"), ..) => {}
                _ => return Err(Error::Protocol(line)),
            }
        }
    }
}

/// What the driver sent and what the host acknowledged, across all rounds.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Every id written to a host.
    pub(crate) sent: BTreeSet<u64>,
    /// Every id acknowledged as durable.
    pub(crate) acked: BTreeSet<u64>,
    /// The sequence number each acknowledged id got.
    pub(crate) acked_seq: BTreeMap<u64, u64>,
    /// Rounds that ended with a SIGKILL of a running host.
    pub(crate) kills: u32,
    /// Rounds whose host had exited by itself before the SIGKILL.
    pub(crate) exited_by_itself: u32,
    next_id: u64,
}

/// The key a message id goes to.
pub(crate) fn key_of(id: u64, keys: usize) -> String {
    format!("counter/{}", id % keys as u64)
}

impl Ledger {
    /// Feeds `count` new messages to `host` and SIGKILLs it after `kill_after`, while it is
    /// busy. Returns how many acks arrived in this round.
    pub(crate) async fn crash_round(
        &mut self,
        mut host: Host,
        count: u64,
        keys: usize,
        kill_after: Duration,
    ) -> Result<usize> {
        let ids: Vec<u64> = (self.next_id..self.next_id + count).collect();
        self.next_id += count;
        self.sent.extend(&ids);
        let mut stdin = host
            .stdin
            .take()
            .ok_or_else(|| Error::Protocol("stdin closed".into()))?;
        let feeder = tokio::spawn(async move {
            // A steady stream, so that the kill lands in the middle of the work.
            for chunk in ids.chunks(20) {
                let mut lines = String::new();
                for id in chunk {
                    lines.push_str(&format!("send {} {id}\n", key_of(*id, keys)));
                }
                if stdin.write_all(lines.as_bytes()).await.is_err() {
                    return;
                }
                let _ = stdin.flush().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Keep stdin open: closing it would end the host before the kill.
            std::future::pending::<()>().await;
        });
        let deadline = tokio::time::Instant::now() + kill_after;
        let mut acks = 0;
        loop {
            tokio::select! {
                line = host.lines.next_line() => match line? {
                    Some(l) => {
                        let mut words = l.strip_prefix("ack ").unwrap_or_default().split(' ');
                        let mut number = || words.next().and_then(|n| n.parse::<u64>().ok());
                        let (Some(id), Some(seq)) = (number(), number()) else {
                            return Err(Error::Protocol(l));
                        };
                        self.acked.insert(id);
                        self.acked_seq.insert(id, seq);
                        acks += 1;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let killed = host.kill().await?;
        feeder.abort();
        if killed {
            self.kills += 1;
        } else {
            self.exited_by_itself += 1;
        }
        Ok(acks)
    }

    /// Checks the final states against the ledger.
    pub(crate) fn verify(&self, states: &BTreeMap<String, (u64, Vec<u64>)>, keys: usize) -> Report {
        let mut report = Report {
            acked: self.acked.len(),
            sent: self.sent.len(),
            kills: self.kills,
            exited_by_itself: self.exited_by_itself,
            ..Report::default()
        };
        // Per key: acknowledged seqs are unique, and applied in seq order.
        let mut seq_owner: BTreeMap<(String, u64), u64> = BTreeMap::new();
        for (&id, &seq) in &self.acked_seq {
            if let Some(other) = seq_owner.insert((key_of(id, keys), seq), id) {
                report.seq_conflicts.push((other, id));
            }
        }
        let mut applied = BTreeSet::new();
        for (key, (count, ids)) in states {
            if *count != ids.len() as u64 {
                report.count_mismatches.push(key.clone());
            }
            let seqs: Vec<u64> = ids
                .iter()
                .filter_map(|id| self.acked_seq.get(id).copied())
                .collect();
            if let Some(w) = seqs.windows(2).find(|w| w[0] >= w[1]) {
                report.out_of_order.push((key.clone(), w[0], w[1]));
            }
            for id in ids {
                if !applied.insert(*id) {
                    report.duplicates.push(*id);
                }
                if !self.sent.contains(id) || key_of(*id, keys) != *key {
                    report.unknown.push(*id);
                }
            }
        }
        report.applied = applied.len();
        report.lost = self.acked.difference(&applied).copied().collect();
        report.applied_unacked = applied.difference(&self.acked).count();
        report
    }
}

/// The outcome of [`Ledger::verify`].
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Messages written to a host.
    pub(crate) sent: usize,
    /// Messages acknowledged.
    pub(crate) acked: usize,
    /// Distinct messages applied.
    pub(crate) applied: usize,
    /// Applied though never acknowledged (durable when the kill cut the ack): allowed.
    pub(crate) applied_unacked: usize,
    /// SIGKILLs of a running host.
    pub(crate) kills: u32,
    /// Hosts that exited by themselves before their SIGKILL: must be 0.
    pub(crate) exited_by_itself: u32,
    /// Two acknowledged ids given the same seq of one key: must be empty.
    pub(crate) seq_conflicts: Vec<(u64, u64)>,
    /// A key that applied a later acknowledged seq before an earlier one (key, seq, then
    /// seq): must be empty.
    pub(crate) out_of_order: Vec<(String, u64, u64)>,
    /// Acknowledged but not applied: must be empty.
    pub(crate) lost: Vec<u64>,
    /// Applied more than once: must be empty.
    pub(crate) duplicates: Vec<u64>,
    /// Applied but never sent, or to the wrong key: must be empty.
    pub(crate) unknown: Vec<u64>,
    /// Keys whose count differs from their record of ids: must be empty.
    pub(crate) count_mismatches: Vec<String>,
}

impl Report {
    /// Whether every invariant holds.
    pub(crate) fn holds(&self) -> bool {
        self.lost.is_empty()
            && self.exited_by_itself == 0
            && self.seq_conflicts.is_empty()
            && self.out_of_order.is_empty()
            && self.duplicates.is_empty()
            && self.unknown.is_empty()
            && self.count_mismatches.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "kills (SIGKILL)          {}", self.kills)?;
        writeln!(f, "hosts that died alone    {}", self.exited_by_itself)?;
        writeln!(f, "seq given twice          {}", self.seq_conflicts.len())?;
        writeln!(f, "applied out of seq order {}", self.out_of_order.len())?;
        writeln!(f, "messages sent            {}", self.sent)?;
        writeln!(f, "acknowledged             {}", self.acked)?;
        writeln!(f, "applied (distinct)       {}", self.applied)?;
        writeln!(f, "applied, ack cut by kill {}", self.applied_unacked)?;
        writeln!(f, "acknowledged but lost    {}", self.lost.len())?;
        writeln!(f, "applied twice            {}", self.duplicates.len())?;
        writeln!(f, "unknown or misrouted     {}", self.unknown.len())?;
        write!(
            f,
            "count != record          {}",
            self.count_mismatches.len()
        )
    }
}

/// Runs the demo: `rounds` crash rounds then a final check, in `data`. `exe` is the `soma`
/// binary (it hosts the actors in a child process).
pub(crate) async fn run(exe: PathBuf, data: PathBuf, rounds: u32, keys: usize) -> Result<Report> {
    let mut ledger = Ledger::default();
    for round in 1..=rounds {
        let host = Host::spawn(&exe, &data).await?;
        let kill_after = Duration::from_millis(fastrand::u64(20..200));
        let acks = ledger.crash_round(host, 2_000, keys, kill_after).await?;
        tracing::info!(
            round,
            acks,
            kill_after_ms = kill_after.as_millis() as u64,
            "host killed with SIGKILL"
        );
        println!(
            "round {round:>2}: {acks:>5} acks, then SIGKILL after {} ms",
            kill_after.as_millis()
        );
    }
    let mut host = Host::spawn(&exe, &data).await?;
    let all_keys: Vec<String> = (0..keys as u64).map(|k| key_of(k, keys)).collect();
    let states = host.dump(&all_keys).await?;
    drop(host);
    Ok(ledger.verify(&states, keys))
}
