//! The registry of one kind of durable actor: resolves a key to its live instance or
//! activates it from the journal, bounds mailboxes, passivates idle actors and supervises
//! every instance one-for-one with backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde::{Deserialize, Serialize};

use crate::actor::DurableActor;
use crate::cell::{Cell, CellMsg};
use crate::codec::{decode, encode_message};
use crate::error::{Error, Result};
use crate::journal::{Append, DeadLetter, Journal, Seq};
use crate::metrics::RegistryMetrics;
use crate::policy::{Backoff, Intensity};
use crate::runtime::{Route, Runtime};
use crate::slot::{Activate, Life, Slot};
use crate::timers::TimerHandle;
use crate::writer::WriterHandle;

/// The exit reason of an instance stopped for idleness.
pub(crate) const PASSIVATED: &str = "passivated";
/// Separates the registry name from the actor key in journal keys.
pub(crate) const KEY_SEPARATOR: char = '\u{1f}';
const MAX_KEY_LEN: usize = 1024;

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
    /// What a send does when the mailbox is full.
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Failed deliveries of one message before it moves to the dead letters.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// An instance idle this long stops, to be activated again by its next message.
    /// `None` keeps instances live until shutdown.
    #[serde(default = "default_passivate_after_ms")]
    pub passivate_after_ms: Option<u64>,
    /// Restarts of one key allowed in a window; past it the key is parked until its next
    /// message, and an error is logged.
    #[serde(default)]
    pub intensity: Intensity,
    /// Delay between restarts of one key.
    #[serde(default)]
    pub backoff: Backoff,
}

fn default_max_in_flight() -> usize {
    1024
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
            when_full: default_when_full(),
            max_attempts: default_max_attempts(),
            passivate_after_ms: default_passivate_after_ms(),
            intensity: Intensity::default(),
            backoff: Backoff::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.chars().any(|c| c.is_control()) {
            return Err(Error::InvalidOption {
                key: "registry.name",
                reason: "must be non-empty without control characters".into(),
            });
        }
        if self.max_in_flight == 0 {
            return Err(Error::InvalidOption {
                key: "registry.max_in_flight",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_attempts == 0 {
            return Err(Error::InvalidOption {
                key: "registry.max_attempts",
                reason: "must be at least 1".into(),
            });
        }
        if self.passivate_after_ms == Some(0) {
            return Err(Error::InvalidOption {
                key: "registry.passivate_after_ms",
                reason: "must be at least 1 (or absent to never passivate)".into(),
            });
        }
        self.backoff.validate()
    }
}

fn check_key(key: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidKey {
            key: key.chars().take(64).collect(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("is longer than 1024 bytes");
    }
    if key.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    Ok(())
}

pub(crate) struct Shared<A: DurableActor> {
    pub(crate) actor: A,
    pub(crate) name: String,
    pub(crate) options: RegistryOptions,
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) metrics: RegistryMetrics,
    pub(crate) timers: TimerHandle,
    pub(crate) owner: Arc<crate::owner::Ownership>,
    writer: WriterHandle,
    slots: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
    /// Running instances: their slot and generation.
    cells: Mutex<HashMap<ActorId, (Arc<Slot>, u64)>>,
    supervisor: Mutex<Option<ActorCell>>,
    stopping: AtomicBool,
    myself: Weak<Shared<A>>,
}

impl<A: DurableActor> Shared<A> {
    fn slots(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cells(&self) -> MutexGuard<'_, HashMap<ActorId, (Arc<Slot>, u64)>> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers which slot and generation an instance serves (called from its `pre_start`).
    pub(crate) fn track(&self, id: ActorId, slot: Arc<Slot>, generation: u64) {
        self.cells().insert(id, (slot, generation));
    }

    fn jkey(&self, key: &str) -> Arc<str> {
        Arc::from(format!("{}{KEY_SEPARATOR}{key}", self.name))
    }

    fn slot_locked(&self, slots: &mut HashMap<Arc<str>, Arc<Slot>>, key: &str) -> Arc<Slot> {
        if let Some(s) = slots.get(key) {
            return s.clone();
        }
        let owner: Weak<dyn Activate> = self.myself.clone();
        let slot = Arc::new(Slot::new(Arc::from(key), self.jkey(key), owner));
        slots.insert(slot.key.clone(), slot.clone());
        slot
    }

    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut slots = self.slots();
        self.slot_locked(&mut slots, key)
    }

    /// Reserves a place in `key`'s mailbox under the map lock, so that an idle slot is never
    /// dropped while a sender holds a reservation on it.
    fn reserve(&self, key: &str) -> Result<Arc<Slot>, Arc<Slot>> {
        let mut slots = self.slots();
        let slot = self.slot_locked(&mut slots, key);
        if slot.try_reserve(self.options.max_in_flight) {
            Ok(slot)
        } else {
            Err(slot)
        }
    }

    /// Drops a passive slot with nothing in flight. Retired under the map lock, so a sender
    /// (who reserves under that lock) never holds it; anyone else holding it is rerouted.
    fn forget_if_idle(&self, slot: &Arc<Slot>) {
        let mut slots = self.slots();
        if slots.get(&slot.key).is_some_and(|s| Arc::ptr_eq(s, slot)) && slot.retire_if_idle() {
            slots.remove(&slot.key);
        }
    }

    fn supervisor(&self) -> Option<ActorCell> {
        self.supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn spawn_instance(self: &Arc<Self>, slot: Arc<Slot>, generation: u64) {
        let shared = self.clone();
        tokio::spawn(async move {
            let Some(sup) = shared.supervisor() else {
                return;
            };
            if shared.stopping.load(Ordering::Acquire) {
                *slot.life() = Life::Passive;
                slot.started.notify_waiters();
                return;
            }
            let cell = Cell {
                shared: shared.clone(),
            };
            match Actor::spawn_linked(None, cell, (slot.clone(), generation), sup).await {
                Ok((instance, _)) => {
                    let mut life = slot.life();
                    // Only this generation's spawn may go live: a late one is stale.
                    if matches!(&*life, Life::Starting(g) if *g == generation) {
                        // Anything appended while starting is picked up by this rescan.
                        let _ = instance.cast(CellMsg::Rescan);
                        *life = Life::Live(instance);
                    }
                    drop(life);
                    slot.started.notify_waiters();
                }
                Err(e) => {
                    let current = {
                        let mut life = slot.life();
                        let current = matches!(&*life, Life::Starting(g) if *g == generation);
                        if current {
                            *life = Life::Restarting;
                        }
                        current
                    };
                    if current {
                        tracing::warn!(registry = %shared.name, key = %slot.key, error = %e, "activation failed");
                        shared.after_failure(slot);
                    }
                }
            }
        });
    }

    /// An instance failed (or could not start) and the slot is `Restarting`: restart it after
    /// a backoff, or park it past the restart intensity.
    fn after_failure(self: &Arc<Self>, slot: Arc<Slot>) {
        let allowed = {
            let mut window = slot.window.lock().unwrap_or_else(|p| p.into_inner());
            window
                .allow(&self.options.intensity)
                .then(|| self.options.backoff.delay(window.recent()))
        };
        let Some(delay) = allowed else {
            tracing::error!(
                registry = %self.name,
                key = %slot.key,
                max_restarts = self.options.intensity.max_restarts,
                window_ms = self.options.intensity.window_ms,
                "restart intensity exceeded, actor parked for one window"
            );
            *slot.life() = Life::Parked;
            slot.started.notify_waiters();
            // A parked key tries again by itself once the window has passed, or earlier when
            // a message arrives.
            let retry = Duration::from_millis(self.options.intensity.window_ms.max(1));
            tokio::spawn(async move {
                tokio::time::sleep(retry).await;
                slot.wake();
            });
            return;
        };
        self.metrics.restarts.increment(1);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            slot.restart();
        });
    }

    fn on_exit(self: &Arc<Self>, cell: &ActorCell, failed: bool, reason: &str) {
        let Some((slot, generation)) = self.cells().remove(&cell.get_id()) else {
            return;
        };
        self.metrics.active.decrement(1.0);
        let mut life = slot.life();
        let current = match &*life {
            Life::Live(instance) => instance.get_id() == cell.get_id(),
            Life::Starting(g) => *g == generation,
            _ => false,
        };
        if !current {
            return; // a stale exit: the slot has moved on
        }
        if self.stopping.load(Ordering::Acquire) {
            *life = Life::Passive;
            drop(life);
            slot.started.notify_waiters();
            return;
        }
        if failed {
            *life = Life::Restarting;
            drop(life);
            tracing::warn!(registry = %self.name, key = %slot.key, reason, "actor failed");
            self.after_failure(slot);
            return;
        }
        *life = Life::Passive;
        drop(life);
        if reason == PASSIVATED {
            self.metrics.passivations.increment(1);
        }
        if slot.in_flight() > 0 {
            slot.wake();
        } else {
            self.forget_if_idle(&slot);
        }
    }
}

impl<A: DurableActor> Activate for Shared<A> {
    fn activate(&self, slot: Arc<Slot>, generation: u64) {
        if let Some(me) = self.myself.upgrade() {
            me.spawn_instance(slot, generation);
        }
    }

    fn reroute(&self, key: &str, appended: Option<Seq>) {
        let slot = self.slot(key);
        match appended {
            Some(seq) => slot.appended_external(seq),
            None => slot.wake(),
        }
    }
}

impl<A: DurableActor> Route for Shared<A> {
    fn appended(&self, key: &str, seq: Seq) {
        self.reroute(key, Some(seq));
    }
}

/// The supervisor actor of a registry's instances.
struct RegistrySupervisor<A: DurableActor> {
    shared: Arc<Shared<A>>,
}

impl<A: DurableActor> Actor for RegistrySupervisor<A> {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match &event {
            SupervisionEvent::ActorFailed(cell, err) => {
                self.shared.on_exit(cell, true, &err.to_string());
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let reason = reason.as_deref().unwrap_or("");
                self.shared.on_exit(cell, reason == "killed", reason);
            }
            _ => {}
        }
        Ok(())
    }
}

/// The handle to every durable actor of one kind. Cheap to clone.
pub struct Registry<A: DurableActor> {
    shared: Arc<Shared<A>>,
}

impl<A: DurableActor> Clone for Registry<A> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<A: DurableActor> std::fmt::Debug for Registry<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<A: DurableActor> Registry<A> {
    pub(crate) async fn start(
        runtime: &Runtime,
        actor: A,
        options: RegistryOptions,
    ) -> Result<Self> {
        options.validate()?;
        let shared = Arc::new_cyclic(|me| Shared {
            actor,
            name: options.name.clone(),
            metrics: RegistryMetrics::new(&options.name),
            options,
            journal: runtime.journal().clone(),
            timers: runtime.timers(),
            owner: runtime.owner(),
            writer: runtime.writer(),
            slots: Mutex::new(HashMap::new()),
            cells: Mutex::new(HashMap::new()),
            supervisor: Mutex::new(None),
            stopping: AtomicBool::new(false),
            myself: me.clone(),
        });
        let (sup, _) = Actor::spawn(
            None,
            RegistrySupervisor {
                shared: shared.clone(),
            },
            (),
        )
        .await
        .map_err(|e| Error::Spawn {
            name: shared.name.clone(),
            detail: e.to_string(),
        })?;
        *shared.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(sup.get_cell());
        runtime.add_route(&shared.name, shared.clone())?;
        // Actors with unacknowledged messages come back by themselves after a restart.
        let prefix = format!("{}{KEY_SEPARATOR}", shared.name);
        let mut pending = Vec::new();
        for (range, _) in shared.owner.held() {
            pending.extend(shared.journal.keys_with_pending(range, &prefix).await?);
        }
        if !pending.is_empty() {
            tracing::info!(registry = %shared.name, actors = pending.len(), "recovering actors with pending messages");
        }
        for jkey in pending {
            if let Some(key) = jkey.strip_prefix(&prefix) {
                shared.slot(key).wake();
            }
        }
        Ok(Self { shared })
    }

    /// The registry's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Sends `msg` to the actor `key`, activating it if needed. Returns the message's sequence
    /// number once it is durable: from then on it will be handled, after any crash.
    pub async fn send(&self, key: &str, msg: &A::Msg) -> Result<Seq> {
        check_key(key)?;
        let payload = bytes::Bytes::from(encode_message(msg)?);
        let shared = &self.shared;
        if shared.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopped { what: "registry" });
        }
        let slot = loop {
            match shared.reserve(key) {
                Ok(slot) => break slot,
                Err(slot) => match shared.options.when_full {
                    WhenFull::Reject => {
                        return Err(Error::MailboxFull {
                            key: key.to_string(),
                            limit: shared.options.max_in_flight,
                        });
                    }
                    WhenFull::Wait => {
                        // A parked key makes no progress by itself: wake it.
                        slot.wake();
                        let progressed = slot.progress.notified();
                        if slot.in_flight() < shared.options.max_in_flight {
                            continue;
                        }
                        progressed.await;
                    }
                },
            }
        };
        let epoch = match shared.owner.require(&slot.jkey) {
            Ok(e) => e,
            Err(e) => {
                slot.unreserve();
                return Err(e);
            }
        };
        let append = Append {
            key: slot.jkey.clone(),
            payload,
            epoch,
        };
        let seq = shared.writer.append(append, slot).await?;
        shared.metrics.enqueued.increment(1);
        Ok(seq)
    }

    /// Waits until the actor `key` has handled (or dead-lettered) every message up to `seq`.
    pub async fn wait_handled(&self, key: &str, seq: Seq) -> Result<()> {
        check_key(key)?;
        let slot = self.shared.slot(key);
        loop {
            let progressed = slot.progress.notified();
            if slot.last_done() >= seq {
                return Ok(());
            }
            tokio::select! {
                _ = progressed => {}
                // A slot dropped while idle gets no more notifications: re-check the journal.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if self.shared.journal.load(&slot.jkey).await?.applied >= seq {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The last committed state of `key` (its initial state if it never committed).
    pub async fn state(&self, key: &str) -> Result<A::State> {
        check_key(key)?;
        let snapshot = self.shared.journal.load(&self.shared.jkey(key)).await?;
        match snapshot.state {
            Some(bytes) => decode("state", &bytes),
            None => Ok(self.shared.actor.init(key)),
        }
    }

    /// Dead letters of this registry (all keys, or one key).
    pub async fn dead_letters(&self, key: Option<&str>) -> Result<Vec<DeadLetter>> {
        let namespace = format!("{}{KEY_SEPARATOR}", self.shared.name);
        let prefix = match key {
            Some(k) => {
                check_key(k)?;
                self.shared.jkey(k).to_string()
            }
            None => namespace.clone(),
        };
        let mut letters = self.shared.journal.dead_letters(&prefix).await?;
        if key.is_some() {
            // The journal matches by prefix: `k1` would also list `k10`.
            letters.retain(|l| l.key == prefix);
        }
        for l in &mut letters {
            if let Some(k) = l.key.strip_prefix(&namespace) {
                l.key = k.to_string();
            }
        }
        Ok(letters)
    }

    /// Sends a dead letter back to its actor as a new message; returns its new sequence number.
    pub async fn redrive(&self, key: &str, seq: Seq) -> Result<Seq> {
        check_key(key)?;
        let slot = self.shared.slot(key);
        let new_seq = self
            .shared
            .journal
            .redrive(&slot.jkey, seq, self.shared.owner.require(&slot.jkey)?)
            .await
            .map_err(|e| match e {
                Error::NoSuchDeadLetter { seq, .. } => Error::NoSuchDeadLetter {
                    key: key.to_string(),
                    seq,
                },
                other => other,
            })?;
        slot.appended_external(new_seq);
        Ok(new_seq)
    }

    /// Activates `key` (loads its state and replays its inbox) without sending to it, and
    /// waits until its instance runs. Use it to warm actors before traffic arrives.
    pub async fn activate(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let mut tried_parked = false;
        loop {
            if self.shared.stopping.load(Ordering::Acquire) {
                return Err(Error::Stopped { what: "registry" });
            }
            // Looked up each round: an idle slot may be retired and replaced meanwhile.
            let slot = self.shared.slot(key);
            let started = slot.started.notified();
            match &*slot.life() {
                Life::Live(_) => return Ok(()),
                // A parked key gets one immediate try; parked again, it is an error.
                Life::Parked if tried_parked => {
                    return Err(Error::Spawn {
                        name: key.to_string(),
                        detail: "parked after exceeding its restart intensity".into(),
                    });
                }
                Life::Parked => tried_parked = true,
                _ => {}
            }
            slot.wake();
            tokio::select! {
                _ = started => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// The number of live (not passivated) instances.
    pub fn live(&self) -> usize {
        self.shared.cells().len()
    }

    /// Kills the live instance of `key`, as a crash would (no `on_stop`); it restarts under
    /// supervision and replays what it had not committed. For tests and chaos.
    pub fn kill(&self, key: &str) -> bool {
        let slot = self.shared.slots().get(key).cloned();
        let Some(slot) = slot else { return false };
        let life = slot.life();
        if let Life::Live(instance) = &*life {
            instance.kill();
            true
        } else {
            false
        }
    }

    /// Stops every instance gracefully (each finishes its current message); further sends
    /// fail with [`Error::Stopped`]. Committed state and unhandled messages stay in the
    /// journal.
    pub async fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Instances still starting go live (or fail) shortly: give them up to a second so
        // that they too stop gracefully rather than being killed with the supervisor.
        for _ in 0..50 {
            let (live, starting) = {
                let slots = self.shared.slots();
                let mut live = Vec::new();
                let mut starting = false;
                for slot in slots.values() {
                    match &*slot.life() {
                        Life::Live(instance) => live.push(instance.clone()),
                        Life::Starting(_) => starting = true,
                        _ => {}
                    }
                }
                (live, starting)
            };
            let stops = live.into_iter().map(|instance| async move {
                let _ = instance
                    .stop_and_wait(
                        Some("registry stopped".into()),
                        Some(Duration::from_secs(10)),
                    )
                    .await;
            });
            futures_util::future::join_all(stops).await;
            if !starting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(sup) = self.shared.supervisor() {
            let _ = sup
                .stop_and_wait(
                    Some("registry stopped".into()),
                    Some(Duration::from_secs(10)),
                )
                .await;
        }
    }
}
