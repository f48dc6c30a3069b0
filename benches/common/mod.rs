//! Helpers shared by the benchmarks.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

/// A numeric field of a `/proc/self` file, e.g. `("status", "VmRSS:")`.
fn proc_field(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/{file}")).ok()?;
    let value = text.lines().find_map(|l| l.strip_prefix(field))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    proc_field("status", "VmRSS:").map_or(0, |kb| kb * 1024)
}

/// Bytes this process caused to be written to storage so far (`/proc/self/io`).
pub fn write_bytes() -> u64 {
    proc_field("io", "write_bytes:").unwrap_or(0)
}

/// Messages per second.
pub fn rate(count: u64, took: Duration) -> f64 {
    count as f64 / took.as_secs_f64()
}

/// The median of a few measurements.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Formats a rate with thousands separators.
pub fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The machine, for the record.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

/// The durable actor of the benchmarks: counts its messages.
#[derive(Debug, Clone, Copy)]
pub struct Sink;

impl soma::DurableActor for Sink {
    type Msg = Vec<u8>;
    type State = u64;

    fn init(&self, _key: &str) -> u64 {
        0
    }

    async fn handle(
        &self,
        _ctx: &mut soma::Context<Vec<u8>>,
        count: &mut u64,
        _msg: Vec<u8>,
    ) -> Result<(), soma::HandlerError> {
        *count += 1;
        Ok(())
    }
}

/// Registry options for benchmarks: large mailboxes, no passivation.
pub fn bench_options(name: &str) -> soma::RegistryOptions {
    let mut o = soma::RegistryOptions::new(name);
    o.max_in_flight = 1 << 20;
    o.passivate_after_ms = None;
    o
}

/// The load of the durable-throughput benchmarks: `senders` tasks over `keys` keys, each
/// sending `per_sender` copies of `payload` (each send returns once durable); then waits
/// until every message is handled. Returns the time to the last acknowledgement and to the
/// last message handled, both from the first send.
pub async fn send_load(
    reg: &soma::Registry<Sink>,
    senders: u64,
    per_sender: u64,
    keys: u64,
    payload: &[u8],
) -> (Duration, Duration) {
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let reg = reg.clone();
            let payload = payload.to_vec();
            tokio::spawn(async move {
                let key = format!("k{}", s % keys);
                let mut last = 0;
                for _ in 0..per_sender {
                    last = reg.send(&key, &payload).await.unwrap();
                }
                (key, last)
            })
        })
        .collect();
    let mut lasts = std::collections::BTreeMap::new();
    for t in tasks {
        let (key, last) = t.await.unwrap();
        let e = lasts.entry(key).or_insert(0);
        *e = (*e).max(last);
    }
    let acked = started.elapsed();
    for (key, last) in &lasts {
        reg.wait_handled(key, *last).await.unwrap();
    }
    (acked, started.elapsed())
}
