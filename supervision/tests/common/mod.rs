//! A counter actor and helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
#![allow(unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_supervision::{Backoff, Context, DurableActor, HandlerError, Intensity, RegistryOptions};
use tokio::sync::{Semaphore, mpsc};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Msg {
    /// Count message `id` once.
    Add(u64),
    /// Fail (return an error) on the first `fail_times` deliveries, then count `id`.
    FailThenAdd { id: u64, fail_times: u32 },
    /// Always panic.
    Poison,
    /// Schedule `Add(id)` to self after `after_ms`.
    Later { id: u64, after_ms: u64 },
    /// Wait for a permit from the test's gate, then count `id`.
    Gated(u64),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub count: u64,
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Activated(String, u64),
    Stopped(String),
    ActivationFailed(String),
}

/// Counts `Add` ids; reports activations and stops on `events`.
#[derive(Debug, Clone)]
pub struct Counter {
    pub events: Option<mpsc::UnboundedSender<Event>>,
    pub gate: Arc<Semaphore>,
    pub attempts: Arc<AtomicU32>,
    /// While set, activation fails (and counts on `activation_failures`).
    pub fail_activate: Arc<AtomicBool>,
    pub activation_failures: Arc<AtomicU32>,
}

impl Counter {
    pub fn new() -> Self {
        Self {
            events: None,
            gate: Arc::new(Semaphore::new(0)),
            attempts: Arc::new(AtomicU32::new(0)),
            fail_activate: Arc::new(AtomicBool::new(false)),
            activation_failures: Arc::new(AtomicU32::new(0)),
        }
    }

    pub fn with_events() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = Self::new();
        c.events = Some(tx);
        (c, rx)
    }
}

fn add(state: &mut State, id: u64) {
    state.count += 1;
    state.ids.push(id);
}

impl DurableActor for Counter {
    type Msg = Msg;
    type State = State;

    fn init(&self, _key: &str) -> State {
        State::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<Msg>,
        state: &mut State,
        msg: Msg,
    ) -> Result<(), HandlerError> {
        match msg {
            Msg::Add(id) => add(state, id),
            Msg::FailThenAdd { id, fail_times } => {
                // Mutate first: a failed handler's changes must not survive.
                add(state, id);
                let n = self.attempts.fetch_add(1, Ordering::SeqCst);
                if n < fail_times {
                    return Err(HandlerError::new(format!("planned failure {n}")));
                }
            }
            Msg::Poison => {
                add(state, u64::MAX);
                panic!("poison message");
            }
            Msg::Later { id, after_ms } => {
                ctx.schedule(Duration::from_millis(after_ms), &Msg::Add(id))?;
            }
            Msg::Gated(id) => {
                self.gate.acquire().await?.forget();
                add(state, id);
            }
        }
        Ok(())
    }

    async fn on_activate(&self, key: &str, state: &mut State) -> Result<(), HandlerError> {
        if self.fail_activate.load(Ordering::SeqCst) {
            self.activation_failures.fetch_add(1, Ordering::SeqCst);
            if let Some(tx) = &self.events {
                let _ = tx.send(Event::ActivationFailed(key.to_string()));
            }
            return Err(HandlerError::new("activation refused"));
        }
        if let Some(tx) = &self.events {
            let _ = tx.send(Event::Activated(key.to_string(), state.count));
        }
        Ok(())
    }

    async fn on_stop(&self, key: &str, _state: &State) -> Result<(), HandlerError> {
        if let Some(tx) = &self.events {
            let _ = tx.send(Event::Stopped(key.to_string()));
        }
        Ok(())
    }
}

/// Registry options for fast tests: no backoff, generous intensity, no passivation.
pub fn options(name: &str) -> RegistryOptions {
    let mut o = RegistryOptions::new(name);
    o.backoff = Backoff::NONE;
    o.intensity = Intensity {
        max_restarts: 100,
        window_ms: 10_000,
    };
    o.passivate_after_ms = None;
    o
}

/// Waits for the next event, failing the test after 10 s.
pub async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no event within 10 s")
        .expect("event channel closed")
}
