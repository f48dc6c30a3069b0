//! Embeds the runtime as a library: a durable supervised counter survives a crash.
//!
//! `cargo run --example durable_counter`

use serde::{Deserialize, Serialize};
use soma::{Context, DurableActor, HandlerError, RegistryOptions, Runtime, RuntimeOptions};

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Add(u64),
    Crash,
}

struct Counter;

impl DurableActor for Counter {
    type Msg = Msg;
    type State = u64;

    fn init(&self, _key: &str) -> u64 {
        0
    }

    async fn handle(
        &self,
        ctx: &mut Context<Msg>,
        total: &mut u64,
        msg: Msg,
    ) -> Result<(), HandlerError> {
        match msg {
            Msg::Add(n) => *total += n,
            // The first delivery panics; the supervisor restarts the actor, which replays it.
            Msg::Crash if ctx.replayed() => println!("seq {} replayed after the crash", ctx.seq()),
            Msg::Crash => panic!("crash while handling seq {}", ctx.seq()),
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("soma-example-{}", std::process::id()));
    let rt = Runtime::open(RuntimeOptions::new(&dir)).await?;
    let counters = rt
        .registry(Counter, RegistryOptions::new("counter"))
        .await?;
    let key = "tenant/acme/counter/1";
    counters.send(key, &Msg::Add(40)).await?; // durable when this returns
    counters.send(key, &Msg::Crash).await?;
    let last = counters.send(key, &Msg::Add(2)).await?;
    counters.wait_handled(key, last).await?;
    println!("total after a crash: {}", counters.state(key).await?); // 42
    rt.shutdown().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
