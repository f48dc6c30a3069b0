//! Registry name to registry, for what reaches a key outside a send (timer firings) and for
//! the runtime's shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::journal::{KeyRange, Seq};

/// What the runtime needs of a running registry.
pub(crate) trait Routed: Send + Sync {
    /// A message was appended to `key` outside a send (a timer fired).
    fn appended(&self, key: &str, seq: Seq);
    /// Stops the registry (see `Registry::stop`).
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// The runtime acquired `range`: activate its keys with pending messages.
    fn acquired(&self, range: KeyRange) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
    /// The runtime is about to release `range`: stop its instances gracefully.
    fn releasing(&self, range: KeyRange) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The registries of a runtime.
#[derive(Clone, Default)]
pub(crate) struct Routes {
    map: Arc<RwLock<HashMap<String, Arc<dyn Routed>>>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes").finish_non_exhaustive()
    }
}

impl Routes {
    /// The registry and actor key of a journal key.
    pub(crate) fn resolve(&self, jkey: &str) -> Option<(Arc<dyn Routed>, String)> {
        let (name, key) = crate::keys::parse(jkey)?;
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|r| (r.clone(), key.to_string()))
    }

    pub(crate) fn add(&self, name: &str, route: Arc<dyn Routed>) -> Result<()> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(name) {
            return Err(Error::InvalidOption {
                key: "registry.name",
                reason: format!("a registry named {name:?} already runs on this runtime"),
            });
        }
        map.insert(name.to_string(), route);
        Ok(())
    }

    /// A handle that does not keep the registries alive (for a registry to remove itself).
    pub(crate) fn downgrade(&self) -> WeakRoutes {
        WeakRoutes(Arc::downgrade(&self.map))
    }

    pub(crate) fn all(&self) -> Vec<Arc<dyn Routed>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The routes, held by a registry without keeping itself alive through them.
#[derive(Clone)]
pub(crate) struct WeakRoutes(std::sync::Weak<RwLock<HashMap<String, Arc<dyn Routed>>>>);

impl WeakRoutes {
    pub(crate) fn remove(&self, name: &str) {
        if let Some(map) = self.0.upgrade() {
            map.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        }
    }
}
