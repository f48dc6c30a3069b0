//! The runtime's clock: wall-clock milliseconds (what durable timers store) that advance with
//! tokio's clock, so that tests can pause and advance time for timers, passivation and
//! restart windows alike.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch, read once, then advanced by tokio's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall_ms: u64,
    at: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            wall_ms: wall_ms(),
            at: Instant::now(),
        }
    }

    /// Now, in milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        self.wall_ms + self.at.elapsed().as_millis() as u64
    }

    /// The tokio instant of a wall-clock time (now if it is past).
    pub(crate) fn instant_of(&self, at_ms: u64) -> Instant {
        Instant::now() + std::time::Duration::from_millis(at_ms.saturating_sub(self.now_ms()))
    }
}

/// The system's wall clock, in milliseconds since the Unix epoch.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
