//! Durable timers: stored in the journal with the commit that scheduled them (per key
//! range), fired by one task per runtime that moves each due timer of an owned range into its
//! actor's inbox. Time is the runtime's [`Clock`]: wall-clock milliseconds advanced by tokio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::journal::{Epoch, Journal, KeyRange};
use crate::owner::Ownership;
use crate::routes::Routes;

const FIRE_BATCH: usize = 512;
/// Timers read at most in one look when earlier ones belong to registries not started yet.
const MAX_LOOK: usize = 1 << 20;
/// How long to wait before retrying timers of a registry that does not exist yet.
const UNROUTED_RETRY: Duration = Duration::from_secs(1);

/// Tells the timer task about new timers.
#[derive(Debug, Clone)]
pub(crate) struct TimerHandle {
    inner: Arc<TimerShared>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

#[derive(Debug)]
struct TimerShared {
    wake: Notify,
    /// The earliest fire time the task is sleeping towards (u64::MAX when none).
    next: AtomicU64,
    clock: Clock,
    stop: watch::Sender<bool>,
}

/// What the timer task works with.
struct Timers {
    journal: Arc<dyn Journal>,
    routes: Routes,
    owner: Arc<Ownership>,
    shared: Arc<TimerShared>,
}

impl TimerHandle {
    pub(crate) fn start(
        journal: Arc<dyn Journal>,
        routes: Routes,
        owner: Arc<Ownership>,
        clock: Clock,
    ) -> Self {
        let inner = Arc::new(TimerShared {
            wake: Notify::new(),
            next: AtomicU64::new(u64::MAX),
            clock,
            stop: watch::Sender::new(false),
        });
        let timers = Timers {
            journal,
            routes,
            owner,
            shared: inner.clone(),
        };
        let task = tokio::spawn(timers.run());
        Self {
            inner,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// A timer at `fire_at_ms` was committed.
    pub(crate) fn scheduled(&self, fire_at_ms: u64) {
        let next = self.inner.next.load(Ordering::Acquire);
        // Wake the task if it sleeps past this timer, or if what it waits for is only
        // timers of registries not started yet (their time is already past).
        if fire_at_ms < next || next <= self.inner.clock.now_ms() {
            self.inner.wake.notify_one();
        }
    }

    /// A registry was added or a range acquired: timers waiting for it can fire.
    pub(crate) fn poke(&self) {
        self.inner.wake.notify_one();
    }

    /// Ends the timer task (a firing in progress completes first).
    pub(crate) async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Timers {
    /// The earliest timer of every owned range.
    async fn next_timer(&self) -> crate::Result<Option<u64>> {
        let mut next: Option<u64> = None;
        for (range, _) in self.owner.held() {
            if let Some(at) = self.journal.next_timer(range).await? {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        Ok(next)
    }

    async fn run(self) {
        let mut stop = self.shared.stop.subscribe();
        let clock = self.shared.clock;
        while !*stop.borrow() {
            let woken = self.shared.wake.notified();
            let next = match self.next_timer().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read timers");
                    None
                }
            };
            self.shared
                .next
                .store(next.unwrap_or(u64::MAX), Ordering::Release);
            let until = match next {
                None => None,
                Some(at) if at <= clock.now_ms() => match self.fire_due(clock.now_ms()).await {
                    Ok(fired) if fired > 0 => continue,
                    Ok(_) => Some(tokio::time::Instant::now() + UNROUTED_RETRY),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot fire timers");
                        Some(tokio::time::Instant::now() + UNROUTED_RETRY)
                    }
                },
                Some(at) => Some(clock.instant_of(at)),
            };
            let sleep = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = sleep => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn fire_due(&self, now: u64) -> crate::Result<usize> {
        let mut fired = 0;
        for (range, epoch) in self.owner.held() {
            fired += self.fire_due_in(range, epoch, now).await?;
        }
        Ok(fired)
    }

    async fn fire_due_in(&self, range: KeyRange, epoch: Epoch, now: u64) -> crate::Result<usize> {
        let mut fired = 0;
        let mut look = FIRE_BATCH;
        loop {
            let due = self.journal.due_timers(range, now, look).await?;
            let complete = due.len() < look;
            let mut routed = 0;
            for timer in due {
                let Some((route, key)) = self.routes.resolve(&timer.key) else {
                    continue;
                };
                routed += 1;
                if routed > FIRE_BATCH {
                    break;
                }
                if let Some(seq) = self.journal.fire_timer(&timer, epoch).await? {
                    tracing::debug!(key = %timer.key, seq, "timer fired");
                    route.appended(&key, seq);
                    fired += 1;
                }
            }
            // Every due timer read belonged to a registry not started yet: look further, so
            // that they never starve the others.
            if fired > 0 || complete || look >= MAX_LOOK {
                return Ok(fired);
            }
            look = (look * 8).min(MAX_LOOK);
        }
    }
}
