//! The registry of one kind of durable actor: resolves a key to its entry, carries out what
//! the key's [`Life`](crate::life) decides (spawn, deliver, restart after a backoff, park,
//! stop, forget), bounds mailboxes, and supervises every instance one-for-one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::actor::DurableActor;
use crate::clock::Clock;
use crate::codec::{decode, encode_message};
use crate::entry::{Handle, InstanceMsg, KeyEntry};
use crate::error::{Error, Result};
use crate::instance::{Instance, Kind};
use crate::journal::{Append, DeadLetter, Journal, KeyRange, Seq};
use crate::keys::{check_key, journal_key, namespace};
use crate::life::{Action, Event, Exit, State};
use crate::options::{RegistryOptions, WhenFull};
use crate::owner::Ownership;
use crate::routes::{Routed, Routes, WeakRoutes};
use crate::timers::TimerHandle;
use crate::writer::{Orphan, WriterHandle};

/// What a registry gets from its runtime.
#[derive(Debug, Clone)]
pub(crate) struct Wiring {
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) writer: WriterHandle,
    pub(crate) timers: TimerHandle,
    pub(crate) owner: Arc<Ownership>,
    pub(crate) routes: Routes,
    pub(crate) clock: Clock,
    /// Registry names that already recovered after this process's unclean open.
    pub(crate) crash_recovered: Arc<Mutex<std::collections::HashSet<String>>>,
}

pub(crate) struct Shared<A: DurableActor> {
    kind: Arc<Kind<A>>,
    writer: WriterHandle,
    routes: WeakRoutes,
    entries: Mutex<HashMap<Arc<str>, Arc<KeyEntry>>>,
    supervisor: Mutex<Option<ActorCell>>,
    stopped: watch::Sender<bool>,
    /// Spawns and delayed restarts: ended (aborted) by `stop`.
    tasks: Mutex<JoinSet<()>>,
    myself: Weak<Shared<A>>,
}

/// Decrements an entry's watcher count when a waiter leaves.
struct Watching(Arc<KeyEntry>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<A: DurableActor> Shared<A> {
    fn entries(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<KeyEntry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry_locked(
        &self,
        entries: &mut HashMap<Arc<str>, Arc<KeyEntry>>,
        key: &str,
    ) -> Arc<KeyEntry> {
        if let Some(e) = entries.get(key) {
            return e.clone();
        }
        let key: Arc<str> = Arc::from(key);
        let entry = Arc::new(KeyEntry::new(
            key.clone(),
            journal_key(&self.kind.name, &key),
        ));
        entries.insert(key, entry.clone());
        entry
    }

    fn entry(&self, key: &str) -> Arc<KeyEntry> {
        let mut entries = self.entries();
        self.entry_locked(&mut entries, key)
    }

    /// The entry of `key`, kept while the guard lives.
    fn watch_entry(&self, key: &str) -> Watching {
        let mut entries = self.entries();
        let entry = self.entry_locked(&mut entries, key);
        entry.watchers.fetch_add(1, Ordering::AcqRel);
        Watching(entry)
    }

    /// Reserves a place in `key`'s mailbox under the map lock, so that an idle entry is never
    /// forgotten while a sender holds a reservation on it.
    fn reserve(&self, key: &str, len: u64) -> Result<Arc<KeyEntry>, Arc<KeyEntry>> {
        let mut entries = self.entries();
        let entry = self.entry_locked(&mut entries, key);
        let o = &self.kind.options;
        if entry.try_reserve(o.max_in_flight, o.max_in_flight_bytes, len) {
            Ok(entry)
        } else {
            Err(entry)
        }
    }

    fn spawn_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    fn apply(self: &Arc<Self>, entry: &Arc<KeyEntry>, event: Event<Handle>) {
        let o = &self.kind.options;
        let action = entry.on(event, &o.intensity, &o.backoff);
        self.perform(entry, action, None);
    }

    /// A message for `entry` is durable at `seq` (`payload` when the caller has it).
    fn arrived(self: &Arc<Self>, entry: &Arc<KeyEntry>, seq: Seq, payload: Option<bytes::Bytes>) {
        let o = &self.kind.options;
        let action = entry.on(Event::Arrived, &o.intensity, &o.backoff);
        self.perform(entry, action, Some((seq, payload)));
    }

    /// A message reached `entry` at `seq` without a place reserved on it (a timer, a
    /// re-drive, a send rerouted from a forgotten entry): count it, then as `arrived`.
    fn arrived_outside(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
        seq: Seq,
        payload: Option<bytes::Bytes>,
    ) {
        entry.seen(seq);
        self.arrived(entry, seq, payload);
    }

    /// Carries out what the key's life decided.
    fn perform(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
        action: Action<Handle>,
        arrival: Option<(Seq, Option<bytes::Bytes>)>,
    ) {
        match action {
            Action::Nothing => {}
            Action::Spawn { generation } => self.spawn_instance(entry.clone(), generation),
            Action::Deliver(handle) => {
                let msg = match arrival {
                    Some((seq, Some(payload))) => InstanceMsg::Deliver { seq, payload },
                    _ => InstanceMsg::Rescan,
                };
                // A failed cast means the instance is dying; its exit restarts or reactivates
                // it, and the new instance reads this message from the journal.
                let _ = handle.cast(msg);
            }
            Action::Rescan(handle) => {
                let _ = handle.cast(InstanceMsg::Rescan);
            }
            Action::RestartAfter { generation, delay } => {
                self.kind.metrics.restarts.increment(1);
                let me = self.clone();
                let entry = entry.clone();
                self.spawn_task(async move {
                    tokio::time::sleep(delay).await;
                    me.apply(&entry, Event::RestartDue { generation });
                });
            }
            Action::Park { generation, retry } => {
                let o = &self.kind.options;
                tracing::error!(
                    registry = %self.kind.name,
                    key = %entry.key,
                    max_restarts = o.intensity.max_restarts,
                    window_ms = o.intensity.window_ms,
                    "restart intensity exceeded, actor parked for one window"
                );
                let me = self.clone();
                let entry = entry.clone();
                self.spawn_task(async move {
                    tokio::time::sleep(retry).await;
                    let pending = entry.in_flight() > 0 || me.has_pending(&entry).await;
                    me.apply(
                        &entry,
                        Event::ParkEnded {
                            generation,
                            pending,
                        },
                    );
                });
            }
            Action::StopInstance(handle) => {
                handle.stop(Some("registry stopped".into()));
            }
            Action::Idle => self.forget_if_idle(entry),
            Action::Reroute => {
                let current = self.entry(&entry.key);
                match arrival {
                    Some((seq, payload)) => self.arrived_outside(&current, seq, payload),
                    None => self.apply(&current, Event::Activate),
                }
            }
        }
    }

    async fn has_pending(&self, entry: &KeyEntry) -> bool {
        match self.kind.journal.load(&entry.jkey).await {
            Ok(s) => self
                .kind
                .journal
                .pending(&entry.jkey, s.applied + 1, 1)
                .await
                .is_ok_and(|p| !p.is_empty()),
            Err(_) => true,
        }
    }

    /// Forgets an idle entry (under the map lock, so no sender holds it).
    fn forget_if_idle(&self, entry: &Arc<KeyEntry>) {
        let o = &self.kind.options;
        let mut entries = self.entries();
        if entries
            .get(&entry.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
            && entry.retire_if_idle(&o.intensity, &o.backoff)
        {
            entries.remove(&entry.key);
        }
    }

    fn supervisor(&self) -> Option<ActorCell> {
        self.supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn spawn_instance(self: &Arc<Self>, entry: Arc<KeyEntry>, generation: u64) {
        let me = self.clone();
        self.spawn_task(async move {
            let Some(sup) = me.supervisor() else { return };
            if me.kind.stopping.load(Ordering::Acquire) {
                // Stopping: nothing new starts (the key ends `Stopped`).
                me.apply(&entry, Event::Stop);
                me.apply(&entry, Event::SpawnFailed { generation });
                return;
            }
            let instance = Instance {
                kind: me.kind.clone(),
            };
            match Actor::spawn_linked(None, instance, (entry.clone(), generation), sup).await {
                Ok((handle, _)) => me.apply(&entry, Event::Spawned { generation, handle }),
                Err(e) => {
                    tracing::warn!(registry = %me.kind.name, key = %entry.key, error = %e, "activation failed");
                    me.apply(&entry, Event::SpawnFailed { generation });
                }
            }
        });
    }

    fn on_exit(self: &Arc<Self>, cell: &ActorCell, failed: bool, reason: &str) {
        let Some((entry, generation)) = self.kind.ended(cell.get_id()) else {
            return;
        };
        self.kind.metrics.active.decrement(1.0);
        let exit = entry.exit_of(generation, failed);
        match exit {
            Exit::Passivated => self.kind.metrics.passivations.increment(1),
            Exit::Released => {}
            Exit::Failed | Exit::Killed => {
                if !self.kind.stopping.load(Ordering::Acquire) {
                    tracing::warn!(registry = %self.kind.name, key = %entry.key, ?exit, reason, "actor failed")
                }
            }
        }
        let o = &self.kind.options;
        // Whether anything waits is read under the life's lock: an arrival racing the exit
        // is either counted here or applied after it (and starts an instance).
        let action = entry.on_with(
            |e| Event::Exited {
                generation,
                exit,
                pending: e.in_flight() > 0,
            },
            &o.intensity,
            &o.backoff,
        );
        self.perform(&entry, action, None);
    }

    /// Stops the registry in a task of its own: a caller that stops waiting does not leave
    /// it half stopped (and later callers wait for the same stop).
    async fn stop(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::spawn(async move { me.stop_inner().await }).await;
    }

    async fn stop_inner(self: &Arc<Self>) {
        if self.kind.stopping.swap(true, Ordering::AcqRel) {
            // Someone else stops it: wait for that to finish.
            let mut stopped = self.stopped.subscribe();
            let _ = stopped.wait_for(|s| *s).await;
            return;
        }
        let entries: Vec<Arc<KeyEntry>> = self.entries().values().cloned().collect();
        let o = &self.kind.options;
        let mut stops = Vec::new();
        for entry in &entries {
            if let Action::StopInstance(handle) = entry.on(Event::Stop, &o.intensity, &o.backoff) {
                stops.push(handle);
            }
        }
        let stops = stops.into_iter().map(|h| async move {
            let _ = h
                .stop_and_wait(
                    Some("registry stopped".into()),
                    Some(Duration::from_secs(10)),
                )
                .await;
        });
        futures_util::future::join_all(stops).await;
        // Instances still starting are stopped as soon as they are up (their life is
        // `Stopping`); wait for each key to settle.
        for entry in &entries {
            let mut state = entry.watch_state();
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                state.wait_for(|s| !matches!(s, State::Stopping)),
            )
            .await;
        }
        if let Some(sup) = self.supervisor() {
            let _ = sup
                .stop_and_wait(
                    Some("registry stopped".into()),
                    Some(Duration::from_secs(10)),
                )
                .await;
        }
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.shutdown().await;
        self.routes.remove(&self.kind.name);
        self.stopped.send_replace(true);
        tracing::info!(registry = %self.kind.name, "registry stopped");
    }
}

impl<A: DurableActor> Shared<A> {
    /// Actors of `ranges` with unacknowledged messages come back by themselves. After a
    /// crash (`after_crash`), where each key's replay begins is recorded (durably, in one
    /// write); a key whose previous replay began at the same message made no durable progress
    /// before the process died: it replays carefully, so that a message that kills the
    /// process is counted and ends in the dead letters instead of taking the node down at
    /// every start.
    async fn recover(
        self: &Arc<Self>,
        ranges: impl Iterator<Item = KeyRange>,
        after_crash: bool,
    ) -> Result<()> {
        let journal = &self.kind.journal;
        let prefix = namespace(&self.kind.name);
        let mut pending = Vec::new();
        for range in ranges {
            pending.extend(journal.keys_with_pending(range, &prefix).await?);
        }
        if pending.is_empty() {
            return Ok(());
        }
        tracing::info!(registry = %self.kind.name, actors = pending.len(), "recovering actors with pending messages");
        let entries: Vec<Arc<KeyEntry>> = pending
            .iter()
            .filter_map(|jkey| jkey.strip_prefix(&prefix))
            .map(|key| self.entry(key))
            .collect();
        if after_crash {
            let mut firsts = Vec::with_capacity(entries.len());
            for entry in &entries {
                let first = journal.load(&entry.jkey).await?.applied + 1;
                firsts.push((entry.jkey.clone(), first));
            }
            let stalled = journal.begin_replays(&firsts).await?;
            for ((entry, (_, first)), stalled) in entries.iter().zip(firsts).zip(stalled) {
                if stalled {
                    tracing::warn!(registry = %self.kind.name, key = %entry.key, seq = first, "the process died while this key replayed: replaying carefully");
                    entry.replay_after_crash();
                }
            }
        }
        for entry in &entries {
            self.apply(entry, Event::Activate);
        }
        Ok(())
    }

    /// After a send's append: count and deliver it, or give its place back.
    fn finish_send(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
        len: u64,
        payload: bytes::Bytes,
        result: Result<Seq>,
    ) -> Result<Seq> {
        match result {
            Ok(seq) => {
                entry.appended(seq);
                self.kind.metrics.enqueued.increment(1);
                self.arrived(entry, seq, Some(payload));
                Ok(seq)
            }
            Err(e) => {
                entry.unreserve(len);
                if matches!(e, Error::OutcomeUnknown { .. }) {
                    // It may be there: let the key look.
                    self.arrived(entry, 0, None);
                }
                Err(e)
            }
        }
    }

    /// Stops the instances of `range`'s keys gracefully; they do not start again here.
    async fn release(self: &Arc<Self>, range: KeyRange) {
        let journal = &self.kind.journal;
        let handles: Vec<Handle> = self
            .entries()
            .values()
            .filter(|e| journal.range_of(&e.jkey) == range)
            .filter_map(|e| e.end_live(Exit::Released))
            .collect();
        let stops = handles.into_iter().map(|h| async move {
            let _ = h
                .stop_and_wait(Some("range released".into()), Some(Duration::from_secs(10)))
                .await;
        });
        futures_util::future::join_all(stops).await;
    }
}

impl<A: DurableActor> Routed for Shared<A> {
    fn acquired(&self, range: KeyRange) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            match self.myself.upgrade() {
                Some(me) => me.recover(std::iter::once(range), false).await,
                None => Ok(()),
            }
        })
    }

    fn releasing(&self, range: KeyRange) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(me) = self.myself.upgrade() {
                me.release(range).await;
            }
        })
    }

    fn appended(&self, key: &str, seq: Seq) {
        if let Some(me) = self.myself.upgrade() {
            me.arrived_outside(&me.entry(key), seq, None);
        }
    }

    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(me) = self.myself.upgrade() {
                Shared::stop(&me).await;
            }
        })
    }
}

/// The supervisor actor of a registry's instances.
struct RegistrySupervisor<A: DurableActor> {
    shared: Weak<Shared<A>>,
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
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        match &event {
            SupervisionEvent::ActorFailed(cell, err) => {
                shared.on_exit(cell, true, &err.to_string())
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                shared.on_exit(cell, false, reason.as_deref().unwrap_or(""))
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

/// A handle to a registry that does not keep it alive (for an actor that sends to its own
/// registry from what the registry owns: a strong handle there would be a cycle).
pub struct WeakRegistry<A: DurableActor> {
    shared: Weak<Shared<A>>,
}

impl<A: DurableActor> Clone for WeakRegistry<A> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<A: DurableActor> std::fmt::Debug for WeakRegistry<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakRegistry").finish_non_exhaustive()
    }
}

impl<A: DurableActor> WeakRegistry<A> {
    /// The registry, while something else keeps it.
    pub fn upgrade(&self) -> Option<Registry<A>> {
        self.shared.upgrade().map(|shared| Registry { shared })
    }
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
            .field("name", &self.shared.kind.name)
            .finish_non_exhaustive()
    }
}

impl<A: DurableActor> Registry<A> {
    pub(crate) async fn start(wiring: Wiring, actor: A, options: RegistryOptions) -> Result<Self> {
        options.validate()?;
        let name = options.name.clone();
        let kind = Arc::new(Kind::new(
            actor,
            options,
            wiring.journal.clone(),
            wiring.timers.clone(),
            wiring.owner.clone(),
            wiring.clock,
        ));
        let shared = Arc::new_cyclic(|me| Shared {
            kind,
            writer: wiring.writer.clone(),
            routes: wiring.routes.downgrade(),
            entries: Mutex::new(HashMap::new()),
            supervisor: Mutex::new(None),
            stopped: watch::Sender::new(false),
            tasks: Mutex::new(JoinSet::new()),
            myself: me.clone(),
        });
        let (sup, _) = Actor::spawn(
            None,
            RegistrySupervisor {
                shared: Arc::downgrade(&shared),
            },
            (),
        )
        .await
        .map_err(|e| Error::Spawn {
            name: name.clone(),
            detail: e.to_string(),
        })?;
        *shared.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(sup.get_cell());
        if let Err(e) = wiring.routes.add(&name, shared.clone()) {
            sup.stop(None);
            return Err(e);
        }
        wiring.timers.poke();
        // After a crash, replay starts are recorded by the first start of each registry
        // name in this process only (a later one would take this process's own progress
        // for a stalled replay).
        let after_crash = wiring.journal.recovered_from_crash()
            && wiring
                .crash_recovered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone());
        shared
            .recover(wiring.owner.held().into_iter().map(|(r, _)| r), after_crash)
            .await?;
        Ok(Self { shared })
    }

    /// A handle that does not keep the registry alive.
    pub fn downgrade(&self) -> WeakRegistry<A> {
        WeakRegistry {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The registry's name.
    pub fn name(&self) -> &str {
        &self.shared.kind.name
    }

    /// The key range `key` belongs to (for [`Runtime::acquire`](crate::Runtime::acquire) and
    /// [`release`](crate::Runtime::release)).
    pub fn range_of(&self, key: &str) -> KeyRange {
        let kind = &self.shared.kind;
        kind.journal.range_of(&journal_key(&kind.name, key))
    }

    /// Sends `msg` to the actor `key`, activating it if needed. Returns the message's sequence
    /// number once it is durable: from then on it will be handled, after any crash.
    /// [`Error::OutcomeUnknown`] means the runtime stopped after the message was handed to
    /// the journal: it may or may not be durable.
    pub async fn send(&self, key: &str, msg: &A::Msg) -> Result<Seq> {
        check_key(key)?;
        let payload = bytes::Bytes::from(encode_message(msg)?);
        let len = payload.len() as u64;
        let shared = &self.shared;
        let stopped = || Error::Stopped { what: "registry" };
        if shared.kind.stopping.load(Ordering::Acquire) {
            return Err(stopped());
        }
        let entry = loop {
            match shared.reserve(key, len) {
                Ok(entry) => break entry,
                Err(entry) => match shared.kind.options.when_full {
                    WhenFull::Reject => {
                        return Err(Error::MailboxFull {
                            key: key.to_string(),
                            limit: shared.kind.options.max_in_flight,
                        });
                    }
                    WhenFull::Wait => {
                        let mut progress = entry.watch();
                        let mut halt = shared.stopped.subscribe();
                        let o = &shared.kind.options;
                        if entry.fits(o.max_in_flight, o.max_in_flight_bytes, len) {
                            continue;
                        }
                        tokio::select! {
                            _ = progress.changed() => {}
                            _ = halt.wait_for(|s| *s) => return Err(stopped()),
                        }
                    }
                },
            }
        };
        let epoch = match shared.kind.owner.require(&entry.jkey) {
            Ok(e) => e,
            Err(e) => {
                entry.unreserve(len);
                return Err(e);
            }
        };
        let append = Append {
            key: entry.jkey.clone(),
            payload: payload.clone(),
            epoch,
        };
        // From the hand-over to the writer on, the send is finished even if the caller stops
        // waiting (a timeout, a select): the writer hands the answer to `orphan`, which gives
        // the place back or delivers, so that nothing is left half done.
        let orphan: Orphan = {
            let me = shared.clone();
            let entry = entry.clone();
            let payload = payload.clone();
            Box::new(move |result| {
                let _ = me.finish_send(&entry, len, payload, result);
            })
        };
        let result = shared.writer.append(append, orphan).await;
        shared.finish_send(&entry, len, payload, result)
    }

    /// Waits until the actor `key` has handled (or dead-lettered) every message up to `seq`.
    pub async fn wait_handled(&self, key: &str, seq: Seq) -> Result<()> {
        check_key(key)?;
        let watching = self.shared.watch_entry(key);
        let entry = &watching.0;
        let mut progress = entry.watch();
        if *progress.borrow_and_update() >= seq {
            return Ok(());
        }
        // Handled before this entry existed?
        let applied = self.shared.kind.journal.load(&entry.jkey).await?.applied;
        if applied >= seq {
            return Ok(());
        }
        let mut halt = self.shared.stopped.subscribe();
        tokio::select! {
            done = progress.wait_for(|d| *d >= seq) => done.map(|_| ()).map_err(|_| Error::Stopped { what: "registry" }),
            _ = halt.wait_for(|s| *s) => Err(Error::Stopped { what: "registry" }),
        }
    }

    /// The last committed state of `key` (its initial state if it never committed).
    pub async fn state(&self, key: &str) -> Result<A::State> {
        check_key(key)?;
        let kind = &self.shared.kind;
        let snapshot = kind.journal.load(&journal_key(&kind.name, key)).await?;
        match snapshot.state {
            Some(bytes) => decode("state", &bytes),
            None => Ok(kind.actor.init(key)),
        }
    }

    /// Dead letters of this registry (all keys, or one key).
    pub async fn dead_letters(&self, key: Option<&str>) -> Result<Vec<DeadLetter>> {
        let kind = &self.shared.kind;
        let namespace = namespace(&kind.name);
        let prefix = match key {
            Some(k) => {
                check_key(k)?;
                journal_key(&kind.name, k).to_string()
            }
            None => namespace.clone(),
        };
        let mut letters = kind.journal.dead_letters(&prefix).await?;
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

    /// `key`'s journal key and the epoch this runtime owns its range at.
    fn owned(&self, key: &str) -> Result<(Arc<str>, crate::Epoch)> {
        check_key(key)?;
        let kind = &self.shared.kind;
        let jkey = journal_key(&kind.name, key);
        let epoch = kind.owner.require(&jkey)?;
        Ok((jkey, epoch))
    }

    /// Removes dead letter `seq` of `key` for good.
    pub async fn discard_dead_letter(&self, key: &str, seq: Seq) -> Result<()> {
        let (jkey, epoch) = self.owned(key)?;
        self.shared
            .kind
            .journal
            .discard_dead_letter(&jkey, seq, epoch)
            .await
            .map_err(named_for(key))
    }

    /// Removes every dead letter of `key`; returns how many.
    pub async fn discard_dead_letters(&self, key: &str) -> Result<u64> {
        check_key(key)?;
        let jkey = journal_key(&self.shared.kind.name, key);
        // The journal matches by prefix: `k1` would also list `k10`.
        self.discard_letters(&jkey, |k| k == &*jkey).await
    }

    /// Removes every dead letter of the keys that start with `prefix`; returns how many.
    pub async fn discard_dead_letters_under(&self, prefix: &str) -> Result<u64> {
        let jprefix = format!("{}{prefix}", namespace(&self.shared.kind.name));
        self.discard_letters(&jprefix, |_| true).await
    }

    /// Removes the dead letters under journal prefix `jprefix` whose key is `wanted`.
    async fn discard_letters(&self, jprefix: &str, wanted: impl Fn(&str) -> bool) -> Result<u64> {
        let kind = &self.shared.kind;
        let mut n = 0;
        for letter in kind.journal.dead_letters(jprefix).await? {
            if !wanted(&letter.key) {
                continue;
            }
            let epoch = kind.owner.require(&letter.key)?;
            match kind
                .journal
                .discard_dead_letter(&letter.key, letter.seq, epoch)
                .await
            {
                Ok(()) => n += 1,
                // Re-driven or discarded meanwhile: gone either way.
                Err(Error::NoSuchDeadLetter { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Removes every stored timer of `key` (a timer already firing may still deliver its
    /// message); returns how many.
    pub async fn discard_timers(&self, key: &str) -> Result<u64> {
        let (jkey, epoch) = self.owned(key)?;
        self.shared.kind.journal.discard_timers(&jkey, epoch).await
    }

    /// Every key of this registry that starts with `prefix` and has a committed state or
    /// messages waiting, in the ranges this runtime owns; sorted.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let kind = &self.shared.kind;
        let namespace = namespace(&kind.name);
        let jprefix = format!("{namespace}{prefix}");
        let ranges: Vec<KeyRange> = kind.owner.held().into_iter().map(|(r, _)| r).collect();
        let mut out = std::collections::BTreeSet::new();
        // Pending first: a key that commits in between is then listed as committed.
        for &range in &ranges {
            out.extend(kind.journal.keys_with_pending(range, &jprefix).await?);
        }
        out.extend(kind.journal.keys_with_state(&ranges, &jprefix).await?);
        Ok(out
            .into_iter()
            .filter_map(|k| k.strip_prefix(namespace.as_str()).map(str::to_string))
            .collect())
    }

    /// Sends a dead letter back to its actor as a new message; returns its new sequence number.
    pub async fn redrive(&self, key: &str, seq: Seq) -> Result<Seq> {
        check_key(key)?;
        let shared = &self.shared;
        let entry = shared.entry(key);
        let epoch = shared.kind.owner.require(&entry.jkey)?;
        let new_seq = shared
            .kind
            .journal
            .redrive(&entry.jkey, seq, epoch)
            .await
            .map_err(named_for(key))?;
        shared.arrived_outside(&entry, new_seq, None);
        Ok(new_seq)
    }

    /// Activates `key` (loads its state and replays its inbox) without sending to it, and
    /// waits until its instance runs. Use it to warm actors before traffic arrives. A key
    /// parked after too many failures is [`Error::Parked`] until its window has passed.
    pub async fn activate(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let shared = &self.shared;
        loop {
            if shared.kind.stopping.load(Ordering::Acquire) {
                return Err(Error::Stopped { what: "registry" });
            }
            let watching = shared.watch_entry(key);
            let entry = &watching.0;
            let mut state = entry.watch_state();
            shared.apply(entry, Event::Activate);
            let settled = state
                .wait_for(|s| {
                    matches!(
                        s,
                        State::Live
                            | State::Parked
                            | State::Stopped
                            | State::Retired
                            | State::Passive
                    )
                })
                .await
                .map(|s| *s);
            match settled {
                Ok(State::Live) => return Ok(()),
                Ok(State::Parked) => {
                    return Err(Error::Parked {
                        key: key.to_string(),
                        retry_ms: shared.kind.options.intensity.window_ms,
                    });
                }
                Ok(State::Stopped) | Err(_) => return Err(Error::Stopped { what: "registry" }),
                // Retired meanwhile, or ended before going live: look again.
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    }

    /// The number of live (not passivated) instances.
    pub fn live(&self) -> usize {
        self.shared.kind.live()
    }

    /// Kills the live instance of `key`, as a crash would (no `on_stop`); it restarts under
    /// supervision and replays what it had not committed. For tests and chaos.
    pub fn kill(&self, key: &str) -> bool {
        let entry = self.shared.entries().get(key).cloned();
        match entry.and_then(|e| e.live()) {
            Some(handle) => {
                handle.kill();
                true
            }
            None => false,
        }
    }

    /// Stops every instance gracefully (each finishes its current message), ends the
    /// registry's tasks and removes it from its runtime (a registry of the same name can be
    /// started again). Further sends fail with [`Error::Stopped`]. Committed state and
    /// unhandled messages stay in the journal.
    pub async fn stop(&self) {
        self.shared.stop().await;
    }
}

/// A missing dead letter named by the registry's key (the journal names its own key).
fn named_for(key: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::NoSuchDeadLetter { seq, .. } => Error::NoSuchDeadLetter {
            key: key.to_string(),
            seq,
        },
        other => other,
    }
}
