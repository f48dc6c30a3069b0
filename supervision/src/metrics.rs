//! Metric names and cached handles. Every name is `soma_supervision_<what>_<unit>`.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Messages accepted (durably appended) per registry.
pub const ENQUEUED: &str = "soma_supervision_enqueued_messages_total";
/// Messages handled and committed per registry.
pub const HANDLED: &str = "soma_supervision_handled_messages_total";
/// Messages handled from the journal after an activation or restart.
pub const REPLAYED: &str = "soma_supervision_replayed_messages_total";
/// Messages moved to the dead letters.
pub const DEAD_LETTERED: &str = "soma_supervision_dead_lettered_messages_total";
/// Actor restarts by a supervisor.
pub const RESTARTS: &str = "soma_supervision_restarts_total";
/// Durable actors currently live (not passivated).
pub const ACTIVE: &str = "soma_supervision_active_actors";
/// Activations of durable actors (cold starts from the journal).
pub const ACTIVATIONS: &str = "soma_supervision_activations_total";
/// Passivations of idle durable actors.
pub const PASSIVATIONS: &str = "soma_supervision_passivations_total";
/// Latency of a journal flush (fsync).
pub const FLUSH_SECONDS: &str = "soma_supervision_journal_flush_seconds";
/// Journal writes refused by fencing (`reason`: `stale_epoch`, `not_next`).
pub const FENCED: &str = "soma_supervision_journal_fenced_total";
/// Messages per group-commit batch.
pub const BATCH_MESSAGES: &str = "soma_supervision_journal_batch_messages";

/// Handles for one registry, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct RegistryMetrics {
    pub(crate) enqueued: Counter,
    pub(crate) handled: Counter,
    pub(crate) replayed: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) restarts: Counter,
    pub(crate) active: Gauge,
    pub(crate) activations: Counter,
    pub(crate) passivations: Counter,
}

impl RegistryMetrics {
    pub(crate) fn new(registry: &str) -> Self {
        let r = registry.to_string();
        Self {
            enqueued: counter!(ENQUEUED, "registry" => r.clone()),
            handled: counter!(HANDLED, "registry" => r.clone()),
            replayed: counter!(REPLAYED, "registry" => r.clone()),
            dead_lettered: counter!(DEAD_LETTERED, "registry" => r.clone()),
            restarts: counter!(RESTARTS, "registry" => r.clone()),
            active: gauge!(ACTIVE, "registry" => r.clone()),
            activations: counter!(ACTIVATIONS, "registry" => r.clone()),
            passivations: counter!(PASSIVATIONS, "registry" => r),
        }
    }
}

pub(crate) fn journal_flushed(took: Duration) {
    histogram!(FLUSH_SECONDS).record(took.as_secs_f64());
}

pub(crate) fn batch_size() -> Histogram {
    histogram!(BATCH_MESSAGES)
}

pub(crate) fn supervisor_restart(supervisor: &str) {
    counter!(RESTARTS, "supervisor" => supervisor.to_string()).increment(1);
}

pub(crate) fn fenced(reason: &crate::error::Fence) {
    let reason = match reason {
        crate::error::Fence::StaleEpoch { .. } => "stale_epoch",
        crate::error::Fence::NotNext { .. } => "not_next",
        crate::error::Fence::LeaseExpired { .. } => "lease_expired",
    };
    counter!(FENCED, "reason" => reason).increment(1);
}
