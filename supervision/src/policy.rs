//! Restart policy as data: strategy, per-child restart kind, intensity and backoff.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which children restart when one of them fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the failed child restarts.
    OneForOne,
    /// Every child restarts (the others are stopped first, in reverse start order).
    OneForAll,
    /// The failed child and every child started after it restart.
    RestForOne,
}

/// Whether a child that exits is restarted (Erlang's `permanent`, `transient`, `temporary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always restarted, even after a normal stop.
    Permanent,
    /// Restarted only after a failure (panic, error, kill).
    Transient,
    /// Never restarted.
    Temporary,
}

impl Restart {
    /// Whether an exit (`failed` or not) calls for a restart.
    pub fn restarts(self, failed: bool) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => failed,
            Restart::Temporary => false,
        }
    }
}

/// How many restarts a supervisor allows in a window before it gives up and fails itself,
/// escalating to its own parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intensity {
    /// Restarts allowed within `window_ms`.
    pub max_restarts: u32,
    /// The sliding window, in milliseconds.
    pub window_ms: u64,
}

impl Default for Intensity {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            window_ms: 5_000,
        }
    }
}

/// Exponential backoff with full jitter between restarts of the same child.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the first restart, in milliseconds.
    pub initial_ms: u64,
    /// Upper bound of the delay, in milliseconds.
    pub max_ms: u64,
    /// Growth factor per consecutive restart.
    pub multiplier: f64,
    /// Fraction of the delay drawn at random (0 = none, 1 = full jitter).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 10,
            max_ms: 5_000,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// No delay at all (tests and benchmarks).
    pub const NONE: Backoff = Backoff {
        initial_ms: 0,
        max_ms: 0,
        multiplier: 1.0,
        jitter: 0.0,
    };

    /// The delay before restart number `attempt` (0-based) of a child.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial_ms as f64 * self.multiplier.powi(attempt.min(64) as i32);
        let capped = base.min(self.max_ms as f64).max(0.0);
        let jitter = capped * self.jitter.clamp(0.0, 1.0) * fastrand::f64();
        Duration::from_micros(((capped - jitter) * 1000.0) as u64)
    }

    /// Checks the values, naming the option that is wrong.
    pub fn validate(&self) -> Result<()> {
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(Error::InvalidOption {
                key: "backoff.multiplier",
                reason: format!("must be a finite number >= 1, got {}", self.multiplier),
            });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::InvalidOption {
                key: "backoff.jitter",
                reason: format!("must be within 0..=1, got {}", self.jitter),
            });
        }
        if self.initial_ms > self.max_ms {
            return Err(Error::InvalidOption {
                key: "backoff.initial_ms",
                reason: format!("{} exceeds backoff.max_ms {}", self.initial_ms, self.max_ms),
            });
        }
        Ok(())
    }
}

/// A sliding window of restart times, for [`Intensity`].
#[derive(Debug, Default)]
pub(crate) struct RestartWindow {
    times: std::collections::VecDeque<tokio::time::Instant>,
}

impl RestartWindow {
    /// Records a restart now; `false` when this restart exceeds the intensity.
    pub(crate) fn allow(&mut self, intensity: &Intensity) -> bool {
        // tokio's clock: tests pause and advance it.
        let now = tokio::time::Instant::now();
        let window = Duration::from_millis(intensity.window_ms);
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.times.pop_front();
        }
        self.times.push_back(now);
        self.times.len() <= intensity.max_restarts as usize
    }

    /// Consecutive restarts within the window, for the backoff exponent.
    pub(crate) fn recent(&self) -> u32 {
        self.times.len().saturating_sub(1) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff {
            initial_ms: 10,
            max_ms: 100,
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(b.delay(0), Duration::from_millis(10));
        assert_eq!(b.delay(1), Duration::from_millis(20));
        assert_eq!(b.delay(3), Duration::from_millis(80));
        assert_eq!(b.delay(10), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 100,
            multiplier: 1.0,
            jitter: 0.5,
        };
        for _ in 0..1000 {
            let d = b.delay(0);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
    }

    #[test]
    fn intensity_window_counts_restarts() {
        let i = Intensity {
            max_restarts: 2,
            window_ms: 60_000,
        };
        let mut w = RestartWindow::default();
        assert!(w.allow(&i));
        assert!(w.allow(&i));
        assert!(!w.allow(&i));
    }

    #[test]
    fn invalid_backoff_names_the_option() {
        let b = Backoff {
            jitter: 2.0,
            ..Backoff::default()
        };
        let e = b.validate().unwrap_err().to_string();
        assert!(e.contains("backoff.jitter"), "{e}");
    }

    #[test]
    fn transient_restarts_only_after_failure() {
        assert!(Restart::Transient.restarts(true));
        assert!(!Restart::Transient.restarts(false));
        assert!(Restart::Permanent.restarts(false));
        assert!(!Restart::Temporary.restarts(true));
    }
}
