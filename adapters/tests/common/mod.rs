//! Real servers for the adapter tests, started on 127.0.0.1 and stopped on drop.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server process with append-only persistence (fsync on every write).
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(port: u16, dir: &Path) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is not installed: run `bash scripts/setup.sh` (Debian package redis-server)")
}

fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn(port, dir.path());
        wait_ready(port);
        Self {
            child: Some(child),
            port,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.port, self.dir.path()));
        wait_ready(self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `tansu` binary: `SOMA_TANSU`, else `.tools/bin/tansu` (built by `scripts/setup.sh`),
/// else `tansu` on the PATH.
fn tansu_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SOMA_TANSU") {
        return p.into();
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/tansu");
    if local.exists() {
        return local;
    }
    "tansu".into()
}

/// A tansu broker (a Kafka-protocol broker) on 127.0.0.1, storing in SQLite in a temporary
/// directory (its in-memory engine cannot fetch from the middle of a record batch).
pub struct KafkaBroker {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn spawn_tansu(port: u16, dir: &Path) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    // SOMA_TANSU_STORAGE=memory://tansu/ for benchmarks that only produce.
    let storage =
        std::env::var("SOMA_TANSU_STORAGE").unwrap_or_else(|_| "sqlite://tansu.db".into());
    Command::new(tansu_binary())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", &storage])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu is not installed: run `bash scripts/setup.sh` (builds it into .tools/)")
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl KafkaBroker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn_tansu(port, dir.path());
        wait_port(port, "tansu");
        Self {
            child: Some(child),
            port,
            dir,
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn_tansu(self.port, self.dir.path()));
        wait_port(self.port, "tansu");
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Set for a child run of a test binary: the data directory, and the round number.
pub const CHILD_DIR: &str = "SOMA_CHILD_DIR";
pub const CHILD_ROUND: &str = "SOMA_CHILD_ROUND";

/// In a child entry point: the data directory its parent test `parent` set. Panics when it is
/// not set, so that a child run by hand (`--ignored`) fails rather than passes without
/// having done anything.
pub fn child_dir(parent: &str) -> std::ffi::OsString {
    std::env::var_os(CHILD_DIR).unwrap_or_else(|| {
        panic!(
            "{CHILD_DIR} is not set: this test is a child process of `{parent}` and runs only \
             when that test spawns it; run `{parent}` instead"
        )
    })
}

/// In a child entry point: the round number its parent test set.
pub fn child_round<T: std::str::FromStr>() -> T {
    let round = std::env::var(CHILD_ROUND)
        .unwrap_or_else(|_| panic!("{CHILD_ROUND} is not set: run by the parent test only"));
    round
        .parse()
        .unwrap_or_else(|_| panic!("{CHILD_ROUND}={round:?} is not a round number"))
}

/// Runs the test `child_test` of this very test binary `rounds` times on `dir`, each time
/// SIGKILLed after `min_ms` plus up to `spread_ms`, and returns every id it printed (one per
/// line, printed once acknowledged). `child_test` is `#[ignore]`d (it means nothing on its
/// own), so it is run with `--ignored --exact`.
pub fn sigkill_rounds(
    child_test: &str,
    dir: &Path,
    rounds: u64,
    min_ms: u64,
    spread_ms: u64,
) -> Vec<String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let mut acked = Vec::new();
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", child_test])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir)
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            // libtest's own lines have spaces; ids do not.
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.is_empty() && !l.contains(' '))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(min_ms + fastrand::u64(0..spread_ms)));
        // The child loops until killed: one that ended by itself did not run (a filter that
        // matched nothing, a child reported as ignored) or failed.
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child test `{child_test}` ended before its SIGKILL in round {round}: {status}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        acked.extend(reader.join().unwrap());
    }
    acked
}
