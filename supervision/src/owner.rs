//! Which key ranges this runtime owns, at which epoch. Sends, commits, dead letters,
//! re-drives and timer firings carry the epoch of their key's range; the journal refuses
//! them once another owner acquired it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::journal::{Epoch, Journal, KeyRange};

/// The ranges held and their epochs.
#[derive(Debug)]
pub(crate) struct Ownership {
    journal: Arc<dyn Journal>,
    held: RwLock<HashMap<u32, Epoch>>,
}

impl Ownership {
    pub(crate) fn new(journal: Arc<dyn Journal>) -> Self {
        Self {
            journal,
            held: RwLock::new(HashMap::new()),
        }
    }

    /// The epoch this runtime holds for the range of `jkey`.
    pub(crate) fn epoch_of(&self, jkey: &str) -> Option<Epoch> {
        let range = self.journal.range_of(jkey);
        self.held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&range.0)
            .copied()
    }

    /// The epoch of `jkey`'s range, or an error naming the range if it is not held here.
    pub(crate) fn require(&self, jkey: &str) -> Result<Epoch> {
        self.epoch_of(jkey).ok_or_else(|| Error::NotOwned {
            key: jkey.to_string(),
            range: self.journal.range_of(jkey),
        })
    }

    /// Every range held, in order.
    pub(crate) fn held(&self) -> Vec<(KeyRange, Epoch)> {
        let mut out: Vec<(KeyRange, Epoch)> = self
            .held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, e)| (KeyRange(*r), *e))
            .collect();
        out.sort_unstable();
        out
    }

    /// Acquires `ranges` (one durable write) and holds them; their new epochs.
    pub(crate) async fn acquire(&self, ranges: &[KeyRange]) -> Result<Vec<Epoch>> {
        let epochs = self.journal.acquire_many(ranges).await?;
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        for (r, e) in ranges.iter().zip(&epochs) {
            held.insert(r.0, *e);
        }
        Ok(epochs)
    }

    /// Stops holding `range` here without telling the journal; the epoch it was held at.
    pub(crate) fn forget(&self, range: KeyRange) -> Option<Epoch> {
        self.held
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&range.0)
    }

    pub(crate) async fn release(&self, range: KeyRange) -> Result<()> {
        let epoch = self
            .held
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&range.0);
        match epoch {
            Some(epoch) => self.journal.release(range, epoch).await,
            None => Ok(()),
        }
    }
}
