//! Options of a registry of durable actors.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::policy::{Backoff, Intensity};

/// What a send does when the actor's mailbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Fail at once with [`Error::MailboxFull`].
    Reject,
    /// Wait until the actor has handled enough to make room.
    Wait,
}

/// Options of a registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryOptions {
    /// The kind of actor, e.g. `session`; journal keys are namespaced by it.
    pub name: String,
    /// Messages accepted and not yet handled, per actor, before sends are refused or wait.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Payload bytes accepted and not yet handled, per actor, before sends are refused or
    /// wait (one message is always accepted into an empty mailbox, whatever its size).
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: u64,
    /// What a send does when the mailbox is full.
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Failed deliveries of one message before it moves to the dead letters. A process that
    /// dies while handling a message (abort, out of memory) counts as a failed delivery.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// An instance idle this long stops, to be activated again by its next message.
    /// `None` keeps instances live until shutdown.
    #[serde(default = "default_passivate_after_ms")]
    pub passivate_after_ms: Option<u64>,
    /// Restarts of one key allowed in a window; past it the key is parked for one window
    /// (messages are accepted meanwhile, and handled after), and an error is logged.
    #[serde(default)]
    pub intensity: Intensity,
    /// Delay between restarts of one key.
    #[serde(default)]
    pub backoff: Backoff,
}

fn default_max_in_flight() -> usize {
    1024
}
fn default_max_in_flight_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_when_full() -> WhenFull {
    WhenFull::Wait
}
fn default_max_attempts() -> u32 {
    3
}
fn default_passivate_after_ms() -> Option<u64> {
    Some(60_000)
}

impl RegistryOptions {
    /// Options with defaults for the registry `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_in_flight: default_max_in_flight(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
            when_full: default_when_full(),
            max_attempts: default_max_attempts(),
            passivate_after_ms: default_passivate_after_ms(),
            intensity: Intensity::default(),
            backoff: Backoff::default(),
        }
    }

    /// Checks every value, naming the option that is wrong.
    pub fn validate(&self) -> Result<()> {
        crate::keys::check_registry(&self.name)?;
        let at_least_one = |key, zero: bool| {
            if zero {
                Err(Error::InvalidOption {
                    key,
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        at_least_one("registry.max_in_flight", self.max_in_flight == 0)?;
        at_least_one(
            "registry.max_in_flight_bytes",
            self.max_in_flight_bytes == 0,
        )?;
        at_least_one("registry.max_attempts", self.max_attempts == 0)?;
        if self.passivate_after_ms == Some(0) {
            return Err(Error::InvalidOption {
                key: "registry.passivate_after_ms",
                reason: "must be at least 1 (or absent to never passivate)".into(),
            });
        }
        self.backoff.validate()
    }
}
