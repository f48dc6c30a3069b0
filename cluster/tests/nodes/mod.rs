//! Cluster nodes as child processes, shared by `tests/cluster_nodes.rs` and
//! `benches/p13_failover.rs`: the ledger actor, the options of a node, the node's workload
//! ([`run_node`]) and how a parent starts one and reads what it prints.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use soma_cluster::membership::Options;
use soma_cluster::{Node, NodeName, RedisOptions};
use soma_supervision::{
    Context, DurableActor, HandlerError, KeyRange, RegistryOptions, RuntimeOptions, range_of,
};
use tokio::sync::mpsc;

pub const CLUSTER: &str = "nodes";
pub const SHARDS: u32 = 64;
pub const KEYS: u64 = 48;
pub const REGISTRY: &str = "ledger";
pub const CHILD_URL: &str = "SOMA_NODES_URL";
pub const CHILD_NODE: &str = "SOMA_NODES_NAME";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    Add(u64),
    Noop,
}

#[derive(Clone)]
pub struct Ledger {
    pub applied: mpsc::UnboundedSender<String>,
}

impl DurableActor for Ledger {
    type Msg = Msg;
    type State = Vec<u64>;

    fn init(&self, _key: &str) -> Vec<u64> {
        Vec::new()
    }

    async fn handle(
        &self,
        ctx: &mut Context<Msg>,
        state: &mut Vec<u64>,
        msg: Msg,
    ) -> Result<(), HandlerError> {
        if let Msg::Add(id) = msg {
            state.push(id);
            let _ = self.applied.send(format!("applied {} {id}", ctx.key()));
        }
        Ok(())
    }
}

pub fn options() -> RegistryOptions {
    let mut o = RegistryOptions::new(REGISTRY);
    o.passivate_after_ms = None;
    o
}

pub fn membership(url: &str, node: &str) -> Options {
    let mut o = Options::new(url, CLUSTER, NodeName::new(node).unwrap());
    o.lease = Duration::from_millis(1000);
    o.renew = Duration::from_millis(250);
    o.clock_bound = Duration::from_millis(200);
    o
}

pub fn journal(url: &str, node: &str) -> RedisOptions {
    let mut o = RedisOptions::new(url, CLUSTER, node);
    o.ranges = SHARDS;
    o.timeout_ms = 1_000;
    o
}

/// One node, until killed or told `drain` on its stdin: sends `Add(id)` to every key in
/// turn, printing `try KEY ID` before each send, `ack KEY ID` for each acknowledged send,
/// `woke` after a pause of the process and `applied KEY ID` for each
/// message its actors handle. Reads the Redis URL and its name from the environment.
pub async fn run_node() {
    if std::env::var_os("SOMA_NODES_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("soma_cluster=debug,soma_supervision=info")
            .with_writer(std::io::stderr)
            .try_init();
    }
    let url = std::env::var(CHILD_URL).unwrap_or_else(|_| panic!("{CHILD_URL} is not set"));
    let name = std::env::var(CHILD_NODE).unwrap();
    let (out, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout().lock();
        while let Some(line) = lines.blocking_recv() {
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        }
    });
    let node = Arc::new(
        Node::start(
            membership(&url, &name),
            journal(&url, &name),
            &RuntimeOptions::new("unused"),
        )
        .await
        .unwrap(),
    );
    let reg = node
        .runtime()
        .registry(
            Ledger {
                applied: out.clone(),
            },
            options(),
        )
        .await
        .unwrap();
    let (drain_tx, mut drain) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_ok() && line.trim() == "drain" {
            let _ = drain_tx.send(());
        }
    });
    let node_index: u64 = name.bytes().last().map_or(0, u64::from);
    // A pause (SIGSTOP) shows as a gap between ticks: `woke` is printed after it, so every
    // `try` printed after `woke` is a send made after the pause.
    let ticks = out.clone();
    tokio::spawn(async move {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if last.elapsed() > Duration::from_millis(700) {
                let _ = ticks.send("woke".into());
            }
            last = Instant::now();
        }
    });
    for i in 0u64.. {
        if drain.try_recv().is_ok() {
            node.drain().await.unwrap();
            out.send("drained".into()).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::process::exit(0);
        }
        // The current incarnation: a node that lost its lease joins again as a new one.
        let incarnation = node.membership().incarnation();
        let id = node_index * 1_000_000_000 + incarnation * 1_000_000 + i;
        let key = format!("k{}", i % KEYS);
        out.send(format!("try {key} {id}")).unwrap();
        if reg.send(&key, &Msg::Add(id)).await.is_ok() {
            out.send(format!("ack {key} {id}")).unwrap();
        } else {
            // Not this node's key now (or Redis is away): do not spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A line a node printed, when the parent read it.
pub struct Line {
    pub node: &'static str,
    pub at: Instant,
    pub text: String,
}

pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
}

impl Drop for Proc {
    /// A parent that fails (panics) must not leave its nodes running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this executable with `args` as node `node`; its lines go to `tx`.
pub fn spawn(args: &[&str], url: &str, node: &'static str, tx: std_mpsc::Sender<Line>) -> Proc {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .env(CHILD_URL, url)
        .env(CHILD_NODE, node)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for text in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = Line {
                node,
                at: Instant::now(),
                text,
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdin = child.stdin.take();
    Proc { child, stdin }
}

/// The shard of actor key `key` of the ledger.
pub fn shard_of(key: &str) -> KeyRange {
    range_of(&format!("{REGISTRY}\u{1f}{key}"), SHARDS)
}

#[derive(Default)]
pub struct Seen {
    pub acked: BTreeSet<u64>,
    /// Per node, how many sends it had acknowledged.
    pub acks: BTreeMap<&'static str, usize>,
    /// Per node, the id of the last send it acknowledged.
    pub last_of: BTreeMap<&'static str, u64>,
}

impl Seen {
    /// How many sends `node` has acknowledged.
    pub fn acks_of(&self, node: &str) -> usize {
        self.acks.get(node).copied().unwrap_or(0)
    }

    pub fn record(&mut self, line: &Line) {
        let w: Vec<&str> = line.text.split_whitespace().collect();
        if let ["ack", _, id] = w.as_slice() {
            let id = id.parse().unwrap();
            self.acked.insert(id);
            *self.acks.entry(line.node).or_default() += 1;
            self.last_of.insert(line.node, id);
        }
    }
}

/// Reads lines until `done` says so; panics after `within`.
pub fn until(
    rx: &std_mpsc::Receiver<Line>,
    seen: &mut Seen,
    within: Duration,
    what: &str,
    mut done: impl FnMut(&Line, &Seen) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{what}: not within {within:?}"));
        seen.record(&line);
        if done(&line, seen) {
            return;
        }
    }
}

/// The incarnation of the node that made the send with this id.
pub fn incarnation_of(id: u64) -> u64 {
    (id / 1_000_000) % 1_000
}

/// SIGKILLs `victim` and reads lines until another node handles a message of one of `keys`
/// (the victim's keys): the failover time, from the SIGKILL.
pub fn kill_and_time_failover(
    victim: &mut Proc,
    name: &str,
    keys: &BTreeSet<String>,
    rx: &std_mpsc::Receiver<Line>,
    seen: &mut Seen,
) -> Duration {
    victim.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    victim.child.wait().unwrap();
    let mut took = None;
    until(
        rx,
        seen,
        Duration::from_secs(30),
        "a moved shard handled",
        |l, _| {
            let w: Vec<&str> = l.text.split_whitespace().collect();
            if let ["applied", key, _] = w.as_slice()
                && l.node != name
                && keys.contains(*key)
            {
                took = Some(l.at.duration_since(killed));
                return true;
            }
            false
        },
    );
    took.unwrap()
}

/// The keys whose shards `node` owns in a placement over `nodes`.
pub fn keys_of(nodes: &[&str], node: &str) -> BTreeSet<String> {
    let names: Vec<NodeName> = nodes.iter().map(|n| NodeName::new(n).unwrap()).collect();
    let placement = soma_cluster::Placement::compute(SHARDS, &names).unwrap();
    let shards: BTreeSet<KeyRange> = placement
        .shards_of(&NodeName::new(node).unwrap())
        .into_iter()
        .collect();
    (0..KEYS)
        .map(|k| format!("k{k}"))
        .filter(|k| shards.contains(&shard_of(k)))
        .collect()
}

/// Reads lines until `node` has acknowledged `more` sends beyond what it had; panics after
/// `within`.
pub fn more_acks(
    rx: &std_mpsc::Receiver<Line>,
    seen: &mut Seen,
    node: &str,
    more: usize,
    within: Duration,
) {
    let before = seen.acks_of(node);
    let what = format!("{more} more acknowledgements from {node}");
    until(rx, seen, within, &what, |_, s| {
        s.acks_of(node) > before + more
    });
}
