//! A message whose handling kills the process (here: `abort`) is replayed at every start and
//! would take the node down again each time. After an unclean open the runtime counts
//! replays that died: past `max_attempts` the message goes to the dead letters and the node
//! stays up, with everything after it handled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use soma_supervision::{
    Backoff, Context, DurableActor, HandlerError, RegistryOptions, Runtime, RuntimeOptions,
};

const CHILD_DIR: &str = "SOMA_CRASH_LOOP_DIR";
const CHILD_SEND: &str = "SOMA_CRASH_LOOP_SEND";

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Add(u64),
    /// Kills the process, as an out-of-memory or a stack overflow would.
    Abort,
}

struct Fragile;

impl DurableActor for Fragile {
    type Msg = Msg;
    type State = Vec<u64>;

    fn init(&self, _key: &str) -> Vec<u64> {
        Vec::new()
    }

    async fn handle(
        &self,
        _ctx: &mut Context<Msg>,
        ids: &mut Vec<u64>,
        msg: Msg,
    ) -> Result<(), HandlerError> {
        match msg {
            Msg::Add(id) => ids.push(id),
            Msg::Abort => std::process::abort(),
        }
        Ok(())
    }
}

fn options() -> RegistryOptions {
    let mut o = RegistryOptions::new("fragile");
    o.max_attempts = 3;
    o.backoff = Backoff::NONE;
    o
}

/// The host: opens the journal; with `CHILD_SEND` set, sends `Add(1), Add(2), Abort`; then
/// waits until seq 3 is handled, sends `Add(4)` and prints the state once it is handled.
#[tokio::test]
#[ignore = "child process of a_message_that_kills_the_process_ends_in_the_dead_letters; run by it"]
async fn child_fragile_host() {
    let dir = std::env::var_os(CHILD_DIR).unwrap_or_else(|| panic!("{CHILD_DIR} is not set"));
    let rt = Runtime::open(RuntimeOptions::new(Path::new(&dir)))
        .await
        .unwrap();
    let reg = rt.registry(Fragile, options()).await.unwrap();
    if std::env::var_os(CHILD_SEND).is_some() {
        for m in [Msg::Add(1), Msg::Add(2), Msg::Abort] {
            // The abort may kill the process before its own send returns.
            let _ = reg.send("k", &m).await;
        }
    }
    reg.wait_handled("k", 3).await.unwrap();
    let seq = reg.send("k", &Msg::Add(4)).await.unwrap();
    reg.wait_handled("k", seq).await.unwrap();
    let dead = reg.dead_letters(Some("k")).await.unwrap();
    println!(
        "handled {:?} dead {:?}",
        reg.state("k").await.unwrap(),
        dead.iter()
            .map(|d| (d.seq, d.error.clone()))
            .collect::<Vec<_>>()
    );
    rt.shutdown().await.unwrap();
}

#[test]
fn a_message_that_kills_the_process_ends_in_the_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut aborted = 0;
    for run in 0..10 {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "child_fragile_host",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path().join("journal"))
        .stdout(Stdio::piped());
        if run == 0 {
            cmd.env(CHILD_SEND, "1");
        }
        let mut child = cmd.spawn().unwrap();
        let out: Vec<String> = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map(|l| l.unwrap())
            .collect();
        let status = child.wait().unwrap();
        if status.success() {
            let line = out.iter().find(|l| l.contains("handled")).unwrap();
            assert!(line.contains("handled [1, 2, 4]"), "{line}");
            assert!(
                line.contains("(3, \"the process died while handling it"),
                "{line}"
            );
            assert!(line.contains("(3 deliveries)"), "{line}");
            // The live delivery and the plain replays that precede the evidence of a stalled
            // replay are not counted; then three counted (careful) replays die.
            assert!(
                (3..=6).contains(&aborted),
                "{aborted} runs died before the dead letter"
            );
            return;
        }
        aborted += 1;
    }
    panic!("the node never came up: {aborted} runs died");
}
