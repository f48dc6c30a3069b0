//! Durable timers: stored in the journal with the commit that scheduled them, fired by one
//! task per runtime that moves each due timer into its actor's inbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::journal::Journal;
use crate::owner::Ownership;
use crate::runtime::Routes;

const FIRE_BATCH: usize = 512;
/// Timers read at most in one look when earlier ones belong to registries not started yet.
const MAX_LOOK: usize = 1 << 20;
/// How long to wait before retrying timers of a registry that does not exist yet.
const UNROUTED_RETRY: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Tells the timer task about new timers.
#[derive(Debug, Clone)]
pub(crate) struct TimerHandle {
    inner: Arc<TimerShared>,
}

#[derive(Debug)]
struct TimerShared {
    wake: Notify,
    /// The earliest fire time the task is sleeping towards (u64::MAX when none).
    next: AtomicU64,
}

impl TimerHandle {
    pub(crate) fn start(journal: Arc<dyn Journal>, routes: Routes, owner: Arc<Ownership>) -> Self {
        let inner = Arc::new(TimerShared {
            wake: Notify::new(),
            next: AtomicU64::new(u64::MAX),
        });
        tokio::spawn(run(journal, routes, owner, inner.clone()));
        Self { inner }
    }

    /// A timer at `fire_at_ms` was committed.
    pub(crate) fn scheduled(&self, fire_at_ms: u64) {
        let next = self.inner.next.load(Ordering::Acquire);
        // Wake the task if it sleeps past this timer, or if what it waits for is only
        // timers of registries not started yet (their time is already past).
        if fire_at_ms < next || next <= now_ms() {
            self.inner.wake.notify_one();
        }
    }

    /// A registry was added: timers waiting for it can fire.
    pub(crate) fn poke(&self) {
        self.inner.wake.notify_one();
    }
}

/// The earliest timer of every owned range.
async fn next_timer(journal: &dyn Journal, owner: &Ownership) -> crate::Result<Option<u64>> {
    let mut next: Option<u64> = None;
    for (range, _) in owner.held() {
        if let Some(at) = journal.next_timer(range).await? {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    Ok(next)
}

async fn run(
    journal: Arc<dyn Journal>,
    routes: Routes,
    owner: Arc<Ownership>,
    shared: Arc<TimerShared>,
) {
    loop {
        let woken = shared.wake.notified();
        let next = match next_timer(&*journal, &owner).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot read timers");
                None
            }
        };
        shared
            .next
            .store(next.unwrap_or(u64::MAX), Ordering::Release);
        let wait = match next {
            None => None,
            Some(at) => {
                let now = now_ms();
                if at <= now {
                    match fire_due(&*journal, &routes, &owner, now).await {
                        Ok(fired) if fired > 0 => continue,
                        Ok(_) => Some(UNROUTED_RETRY),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot fire timers");
                            Some(UNROUTED_RETRY)
                        }
                    }
                } else {
                    Some(Duration::from_millis(at - now))
                }
            }
        };
        match wait {
            Some(d) => {
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
            None => woken.await,
        }
    }
}

async fn fire_due(
    journal: &dyn Journal,
    routes: &Routes,
    owner: &Ownership,
    now: u64,
) -> crate::Result<usize> {
    let mut fired = 0;
    for (range, epoch) in owner.held() {
        fired += fire_due_in(journal, routes, range, epoch, now).await?;
    }
    Ok(fired)
}

async fn fire_due_in(
    journal: &dyn Journal,
    routes: &Routes,
    range: crate::journal::KeyRange,
    epoch: crate::journal::Epoch,
    now: u64,
) -> crate::Result<usize> {
    let mut fired = 0;
    let mut look = FIRE_BATCH;
    loop {
        let due = journal.due_timers(range, now, look).await?;
        let complete = due.len() < look;
        let mut routed = 0;
        for timer in due {
            let Some((route, key)) = routes.resolve(&timer.key) else {
                continue;
            };
            routed += 1;
            if routed > FIRE_BATCH {
                break;
            }
            if let Some(seq) = journal.fire_timer(&timer, epoch).await? {
                tracing::debug!(key = %timer.key, seq, "timer fired");
                route.appended(&key, seq);
                fired += 1;
            }
        }
        // Every due timer read belonged to a registry not started yet: look further, so that
        // they never starve the others.
        if fired > 0 || complete || look >= MAX_LOOK {
            return Ok(fired);
        }
        look = (look * 8).min(MAX_LOOK);
    }
}
