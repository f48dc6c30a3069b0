//! The embedded episodic memory on sled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::{Entry, EpisodicMemory, Scope, Stored, check_id};
use crate::error::{Error, Result};

const HISTORY: u8 = b'h';
const BY_TIME: u8 = b'x';

/// [`EpisodicMemory`] on sled: one tree, keys ordered by scope then time, and a time index
/// for expiry.
#[derive(Debug, Clone)]
pub struct SledEpisodic {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    path: PathBuf,
}

fn push_part(k: &mut Vec<u8>, part: &str) {
    k.extend_from_slice(&(part.len() as u16).to_be_bytes());
    k.extend_from_slice(part.as_bytes());
}

fn tenant_prefix(tenant: &str) -> Vec<u8> {
    let mut k = vec![HISTORY];
    push_part(&mut k, tenant);
    k
}

fn scope_prefix(scope: &Scope) -> Vec<u8> {
    let mut k = tenant_prefix(scope.tenant());
    push_part(&mut k, scope.session());
    k
}

fn history_key(scope: &Scope, at_ms: u64, id: u64) -> Vec<u8> {
    let mut k = scope_prefix(scope);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The time-index key of a history key: time first, then the history key's scope and id.
fn index_key(history: &[u8], at_ms: u64) -> Vec<u8> {
    let mut k = vec![BY_TIME];
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(history);
    k
}

/// The `at_ms` and id at the end of a history key.
fn tail(history: &[u8]) -> Option<(u64, u64)> {
    let n = history.len().checked_sub(16)?;
    let at = u64::from_be_bytes(history[n..n + 8].try_into().ok()?);
    let id = u64::from_be_bytes(history[n + 8..].try_into().ok()?);
    Some((at, id))
}

impl SledEpisodic {
    /// Opens (or creates) the store in `path`.
    /// A damaged store is an error naming the path, never a panic (the engine's panics on
    /// damaged files are caught).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = crate::store::open_sled(&path)?;
        Ok(Self {
            inner: Arc::new(Inner { db, path }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Store {
                path: self.inner.path.clone(),
                source: Box::new(e),
            })?
    }
}

impl Inner {
    fn engine(&self, e: sled::Error) -> Error {
        Error::Store {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<Stored> {
        let (_, id) = tail(key).ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            detail: "history key too short".into(),
        })?;
        let entry: Entry = serde_json::from_slice(value).map_err(|e| Error::Corrupt {
            path: self.path.clone(),
            detail: format!("entry {id}: {e}"),
        })?;
        Ok(Stored { id, entry })
    }

    /// Removes every history entry under `prefix` and its index key; durable on return.
    fn erase_prefix(&self, prefix: &[u8]) -> Result<u64> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.db.scan_prefix(prefix) {
            let (k, _) = item.map_err(|e| self.engine(e))?;
            if let Some((at, _)) = tail(&k) {
                batch.remove(index_key(&k, at));
            }
            batch.remove(k);
            n += 1;
        }
        self.db.apply_batch(batch).map_err(|e| self.engine(e))?;
        self.db.flush().map_err(|e| self.engine(e))?;
        Ok(n)
    }
}

impl SledEpisodic {
    async fn append_inner(&self, scope: &Scope, entry: Entry) -> Result<u64> {
        let inner = &self.inner;
        let id = inner.db.generate_id().map_err(|e| inner.engine(e))?;
        let key = history_key(scope, entry.at_ms, id);
        let value = serde_json::to_vec(&entry).map_err(|e| Error::Corrupt {
            path: inner.path.clone(),
            detail: format!("cannot encode entry: {e}"),
        })?;
        let mut batch = sled::Batch::default();
        batch.insert(index_key(&key, entry.at_ms), &[][..]);
        batch.insert(key, value);
        inner.db.apply_batch(batch).map_err(|e| inner.engine(e))?;
        // Acknowledged means durable: an appended entry survives a crash.
        crate::store::flush_sled(&inner.db)
            .await
            .map_err(|e| inner.engine(e))?;
        Ok(id)
    }
}

#[async_trait]
impl EpisodicMemory for SledEpisodic {
    #[tracing::instrument(level = "debug", skip(self, entry), fields(backend = "sled", tenant = scope.tenant()))]
    async fn append(&self, scope: &Scope, entry: Entry) -> Result<u64> {
        let started = std::time::Instant::now();
        let id = self.append_inner(scope, entry).await?;
        metrics::counter!("soma_adapters_episodic_appended_total", "backend" => "sled")
            .increment(1);
        metrics::histogram!("soma_adapters_episodic_append_seconds", "backend" => "sled")
            .record(started.elapsed().as_secs_f64());
        Ok(id)
    }

    async fn last(&self, scope: &Scope, n: usize) -> Result<Vec<Stored>> {
        let prefix = scope_prefix(scope);
        self.blocking(move |inner| {
            let mut out = inner
                .db
                .scan_prefix(prefix)
                .rev()
                .take(n)
                .map(|item| {
                    let (k, v) = item.map_err(|e| inner.engine(e))?;
                    inner.decode(&k, &v)
                })
                .collect::<Result<Vec<_>>>()?;
            out.reverse();
            Ok(out)
        })
        .await
    }

    async fn range(&self, scope: &Scope, from_ms: u64, to_ms: u64) -> Result<Vec<Stored>> {
        if from_ms >= to_ms {
            return Ok(Vec::new());
        }
        let prefix = scope_prefix(scope);
        self.blocking(move |inner| {
            let mut start = prefix.clone();
            start.extend_from_slice(&from_ms.to_be_bytes());
            let mut end = prefix;
            end.extend_from_slice(&to_ms.to_be_bytes());
            inner
                .db
                .range(start..end)
                .map(|item| {
                    let (k, v) = item.map_err(|e| inner.engine(e))?;
                    inner.decode(&k, &v)
                })
                .collect()
        })
        .await
    }

    async fn expire_before(&self, cutoff_ms: u64) -> Result<u64> {
        self.blocking(move |inner| {
            let mut end = vec![BY_TIME];
            end.extend_from_slice(&cutoff_ms.to_be_bytes());
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in inner.db.range(vec![BY_TIME]..end) {
                let (k, _) = item.map_err(|e| inner.engine(e))?;
                if let Some(history) = k.get(9..) {
                    batch.remove(history);
                }
                batch.remove(k);
                n += 1;
            }
            inner.db.apply_batch(batch).map_err(|e| inner.engine(e))?;
            // Expired entries may be personal data: they must not come back after a crash.
            inner.db.flush().map_err(|e| inner.engine(e))?;
            Ok(n)
        })
        .await
    }

    async fn erase_session(&self, scope: &Scope) -> Result<u64> {
        let prefix = scope_prefix(scope);
        self.blocking(move |inner| inner.erase_prefix(&prefix))
            .await
    }

    async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        check_id("tenant", tenant)?;
        let prefix = tenant_prefix(tenant);
        self.blocking(move |inner| inner.erase_prefix(&prefix))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope_strategy() -> impl Strategy<Value = Scope> {
        ("[a-z0-9/]{1,12}", "[a-z0-9/]{1,12}").prop_map(|(t, s)| Scope::new(t, s).unwrap())
    }

    proptest! {
        /// A history key of one scope never falls under another scope's or tenant's prefix.
        #[test]
        fn keys_of_different_scopes_never_share_a_prefix(
            a in scope_strategy(),
            b in scope_strategy(),
            at in any::<u64>(),
            id in any::<u64>(),
        ) {
            let key = history_key(&a, at, id);
            prop_assert_eq!(tail(&key), Some((at, id)));
            if a != b {
                prop_assert!(!key.starts_with(&scope_prefix(&b)));
            }
            if a.tenant() != b.tenant() {
                prop_assert!(!key.starts_with(&tenant_prefix(b.tenant())));
            }
            let index = index_key(&key, at);
            prop_assert_eq!(&index[9..], key.as_slice());
        }
    }
}
