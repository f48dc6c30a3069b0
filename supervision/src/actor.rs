//! The user-facing trait of a durable actor and the context its handler gets.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::encode_message;
use crate::error::Result;
use crate::journal::{NewTimer, Seq};

/// Why a handler failed. Built from any error or message; counts as a failed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError(String);

impl HandlerError {
    /// A failure with this description.
    pub fn new(reason: impl std::fmt::Display) -> Self {
        Self(reason.to_string())
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

/// A durable actor: typed messages in, a typed state that survives crashes.
///
/// Messages for one key are handled one at a time, in journal order. When `handle` returns
/// `Ok`, the new state and the acknowledgement of the message commit atomically. When it
/// returns `Err` or panics, the state change is discarded; the message is retried after a
/// supervised restart, and moved to the dead letters after `max_attempts` failures.
///
/// A handler may run more than once for one message (crash before its commit), so effects
/// outside the state must be idempotent; effects on the state happen exactly once.
pub trait DurableActor: Send + Sync + 'static {
    /// The message type (bincode through serde on disk).
    type Msg: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The state type (bincode through serde on disk).
    type State: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The state of a key that never committed one.
    fn init(&self, key: &str) -> Self::State;

    /// Handles one message.
    fn handle(
        &self,
        ctx: &mut Context<Self::Msg>,
        state: &mut Self::State,
        msg: Self::Msg,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Runs when the actor is activated, before any message; a failure or panic here fails
    /// the activation (supervised like a failed handler, with backoff).
    fn on_activate(
        &self,
        _key: &str,
        _state: &mut Self::State,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// Runs on a graceful stop (passivation or shutdown), not on a kill or a crash.
    fn on_stop(
        &self,
        _key: &str,
        _state: &Self::State,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }
}

/// The most timers one handler may schedule for one message.
pub const MAX_TIMERS_PER_MESSAGE: usize = 1024;

/// What a handler knows about the message it handles, and what it can ask for.
#[derive(Debug)]
pub struct Context<M> {
    key: std::sync::Arc<str>,
    seq: Seq,
    replayed: bool,
    clock: crate::clock::Clock,
    pub(crate) timers: Vec<NewTimer>,
    _msg: std::marker::PhantomData<fn(M)>,
}

impl<M: Serialize> Context<M> {
    pub(crate) fn new(
        key: std::sync::Arc<str>,
        seq: Seq,
        replayed: bool,
        clock: crate::clock::Clock,
    ) -> Self {
        Self {
            key,
            seq,
            replayed,
            clock,
            timers: Vec::new(),
            _msg: std::marker::PhantomData,
        }
    }

    /// The actor's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The message's sequence number within this key (1, 2, 3, ...).
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Whether this message is handled from the journal after an activation or restart
    /// rather than delivered live.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// Schedules `msg` to this actor after `after` (on the runtime's clock, which tokio's
    /// paused time advances in tests). The timer is persisted with this handler's commit: it
    /// exists only if the handler succeeds, and it fires after any restart.
    pub fn schedule(&mut self, after: Duration, msg: &M) -> Result<()> {
        let fire_at_ms = self.clock.now_ms() + after.as_millis() as u64;
        self.push_timer(fire_at_ms, msg)
    }

    fn push_timer(&mut self, fire_at_ms: u64, msg: &M) -> Result<()> {
        if self.timers.len() >= MAX_TIMERS_PER_MESSAGE {
            return Err(crate::error::Error::InvalidOption {
                key: "context.schedule",
                reason: format!(
                    "a handler schedules at most {MAX_TIMERS_PER_MESSAGE} timers per message"
                ),
            });
        }
        self.timers.push(NewTimer {
            fire_at_ms,
            payload: encode_message(msg)?,
        });
        Ok(())
    }

    /// Schedules `msg` to this actor at `at` (see [`Context::schedule`](Self::schedule)).
    pub fn schedule_at(&mut self, at: SystemTime, msg: &M) -> Result<()> {
        let fire_at_ms = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.push_timer(fire_at_ms, msg)
    }
}
