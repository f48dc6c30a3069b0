//! Live updates of sessions to their subscribers: tokens as they are generated and events as
//! they happen, over a bounded broadcast channel per session. A subscriber that falls more
//! than [`LIVE_BUFFER`] updates behind is ended with [`Error::Lagged`] (and resubscribes from
//! the last sequence number it saw), never buffered without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::SessionEvent;
use crate::error::{Error, Result};

/// Updates a subscriber may fall behind by before it is ended.
pub const LIVE_BUFFER: usize = 1024;

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Generated text of the answer of `turn` (not durable: a turn replayed after a crash
    /// streams its answer again).
    Token {
        /// The turn.
        turn: u64,
        /// The text.
        text: String,
    },
    /// An event, with its sequence number in the session.
    Event(SessionEvent),
}

/// Per session key, the sender of its live updates.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    senders: Mutex<HashMap<String, broadcast::Sender<Update>>>,
}

impl Hub {
    fn sender(&self, key: &str) -> broadcast::Sender<Update> {
        let mut map = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.to_string())
            .or_insert_with(|| broadcast::channel(LIVE_BUFFER).0)
            .clone()
    }

    /// Sends `update` to the subscribers of `key` (none is fine).
    pub(crate) fn publish(&self, key: &str, update: Update) {
        let mut map = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        // A channel nobody listens to any more is dropped (a subscriber makes a new one).
        if let Some(tx) = map.get(key)
            && tx.send(update).is_err()
        {
            map.remove(key);
        }
    }

    /// A receiver of `key`'s live updates from now on.
    pub(crate) fn receiver(&self, key: &str) -> broadcast::Receiver<Update> {
        self.sender(key).subscribe()
    }

    /// Forgets `key` (its subscribers see the end).
    pub(crate) fn remove(&self, key: &str) {
        let mut map = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }
}

/// A subscription to a session: the durable events from the sequence number asked for,
/// then live updates.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) backlog: VecDeque<SessionEvent>,
    pub(crate) live: broadcast::Receiver<Update>,
    /// The highest event seq handed out.
    pub(crate) last: Option<u64>,
    pub(crate) session: String,
}

impl Subscription {
    /// The next update; `None` when the session was deleted (or the runtime stopped).
    /// [`Error::Lagged`] when this subscriber fell too far behind: resubscribe from the last
    /// seq seen.
    pub async fn next(&mut self) -> Option<Result<Update>> {
        if let Some(e) = self.backlog.pop_front() {
            self.last = Some(e.seq);
            return Some(Ok(Update::Event(e)));
        }
        loop {
            match self.live.recv().await {
                Ok(Update::Event(e)) => {
                    if self.last.is_some_and(|l| e.seq <= l) {
                        continue;
                    }
                    self.last = Some(e.seq);
                    return Some(Ok(Update::Event(e)));
                }
                Ok(token) => return Some(Ok(token)),
                Err(broadcast::error::RecvError::Closed) => return None,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(Err(Error::Lagged {
                        session: self.session.clone(),
                        missed: n,
                        resume_from: self.last.map_or(0, |l| l + 1),
                    }));
                }
            }
        }
    }
}
