//! A tenant's open sessions: a durable actor per tenant (registry `directory`) that admits a
//! new session only while fewer than the tenant's quota are open, atomically. (What a tenant
//! has, for erasure, is listed from the registries' keys: no list here grows with it.)

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};

use crate::error::Result;
use crate::tenant::Tenants;

/// A tenant's open sessions (at most its quota of concurrent sessions).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Listing {
    /// Sessions open now.
    pub open: BTreeSet<String>,
}

/// The directory actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DirectoryMsg {
    /// Opens a session if fewer than `limit` are open (it is then in `open`).
    OpenSession {
        /// The session.
        id: String,
        /// Sessions open at once, at most.
        limit: u32,
    },
    /// A session was deleted.
    CloseSession(String),
    /// Everything was erased.
    Clear,
}

/// The directory actor.
#[derive(Debug)]
pub struct DirectoryActor {
    tenants: Tenants,
}

impl DurableActor for DirectoryActor {
    type Msg = DirectoryMsg;
    type State = Listing;

    fn init(&self, _key: &str) -> Listing {
        Listing::default()
    }

    async fn handle(
        &self,
        ctx: &mut Context<DirectoryMsg>,
        s: &mut Listing,
        msg: DirectoryMsg,
    ) -> std::result::Result<(), HandlerError> {
        match msg {
            DirectoryMsg::OpenSession { id, limit } => {
                // Read when handled: once the tenant's erasure began, nothing opens.
                if !self
                    .tenants
                    .is_live(ctx.key())
                    .await
                    .map_err(HandlerError::new)?
                {
                    return Ok(());
                }
                if s.open.contains(&id) || s.open.len() < limit as usize {
                    s.open.insert(id);
                }
            }
            DirectoryMsg::CloseSession(id) => {
                s.open.remove(&id);
            }
            DirectoryMsg::Clear => *s = Listing::default(),
        }
        Ok(())
    }
}

/// The directories of a runtime's tenants.
#[derive(Debug, Clone)]
pub(crate) struct Directory {
    registry: Registry<DirectoryActor>,
}

impl Directory {
    pub(crate) async fn open(rt: &Runtime, tenants: Tenants) -> Result<Self> {
        let mut options = RegistryOptions::new("directory");
        options.passivate_after_ms = Some(60_000);
        Ok(Self {
            registry: rt.registry(DirectoryActor { tenants }, options).await?,
        })
    }

    /// Records `msg` for `tenant` (durable on return; handled in order with later ones).
    pub(crate) async fn note(&self, tenant: &str, msg: DirectoryMsg) -> Result<()> {
        self.registry.send(tenant, &msg).await?;
        Ok(())
    }

    /// Opens session `id` of `tenant` if fewer than `limit` are open; false if not.
    pub(crate) async fn open_session(&self, tenant: &str, id: &str, limit: u32) -> Result<bool> {
        let msg = DirectoryMsg::OpenSession {
            id: id.to_string(),
            limit,
        };
        let seq = self.registry.send(tenant, &msg).await?;
        self.registry.wait_handled(tenant, seq).await?;
        Ok(self.registry.state(tenant).await?.open.contains(id))
    }

    /// Forgets `tenant`'s open sessions and its dead letters (its erasure).
    pub(crate) async fn clear(&self, tenant: &str) -> Result<()> {
        let seq = self.registry.send(tenant, &DirectoryMsg::Clear).await?;
        self.registry.wait_handled(tenant, seq).await?;
        self.registry.discard_dead_letters(tenant).await?;
        Ok(())
    }
}
