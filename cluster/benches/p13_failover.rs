//! P13: failover time. Three cluster nodes as separate processes (this executable, started
//! again as a node) over one redis-server, each sending to keys all over the key space; 20
//! times a random node is SIGKILLed under load, and the time from the SIGKILL to the first
//! message of one of its shards handled by a survivor is taken (lease 1 s, renewal every
//! 250 ms, included); the node is then started again and the shards hand off back to it.
//! Prints the distribution. (Exactly-once across these moves is what
//! `tests/cluster_nodes.rs` counts.)
//!
//! `cargo bench -p soma-cluster --bench p13_failover`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "../../adapters/tests/common/mod.rs"]
mod common;
#[path = "../tests/nodes/mod.rs"]
mod nodes;

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use nodes::{CHILD_NODE, Line, Seen, keys_of, kill_and_time_failover, more_acks, spawn, until};

const KILLS: usize = 20;
const NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];

fn main() {
    if std::env::var_os(CHILD_NODE).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(nodes::run_node());
        return;
    }
    let redis = common::RedisServer::start();
    let url = redis.url();
    let (tx, rx) = std_mpsc::channel::<Line>();
    let mut seen = Seen::default();
    let mut procs = BTreeMap::new();
    for n in NAMES {
        procs.insert(n, spawn(&[], &url, n, tx.clone()));
    }
    until(
        &rx,
        &mut seen,
        Duration::from_secs(60),
        "all three serving",
        |_, s| s.acks.len() == 3 && s.acks.values().all(|n| *n >= 300),
    );
    let mut times = Vec::new();
    for kill in 0..KILLS {
        let victim = fastrand::usize(0..NAMES.len());
        let name = NAMES[victim];
        let keys = keys_of(&NAMES, name);
        let mut p = procs.remove(name).unwrap();
        let took = kill_and_time_failover(&mut p, name, &keys, &rx, &mut seen);
        println!("kill {kill:2}: {name} -> first moved message handled after {took:?}");
        times.push(took);
        // Back to three: the node starts again and its shards hand off back to it.
        procs.insert(name, spawn(&[], &url, name, tx.clone()));
        more_acks(&rx, &mut seen, name, 300, Duration::from_secs(30));
    }
    for (_, mut p) in procs {
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "P13 failover over {KILLS} SIGKILLs (lease 1 s): min {:?}, p50 {:?}, p90 {:?}, max {:?} \
         (target < 2 s: {})",
        times[0],
        at(0.5),
        at(0.9),
        times[times.len() - 1],
        if times[times.len() - 1] < Duration::from_secs(2) {
            "met"
        } else {
            "missed"
        }
    );
}
