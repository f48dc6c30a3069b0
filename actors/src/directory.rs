//! What a tenant has, by id: a durable actor per tenant (registry `directory`) listing its
//! sessions and tool calls, so that erasing the tenant can find every one of them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};

use crate::error::Result;

/// A tenant's entities.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Listing {
    /// Session ids (open or deleted: what erasure must reach).
    pub sessions: BTreeSet<String>,
    /// Sessions open now.
    pub open: BTreeSet<String>,
    /// Tool-call ids.
    pub calls: BTreeSet<String>,
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
    /// A tool call was made.
    Call(String),
    /// Everything was erased.
    Clear,
    /// Nothing: handled after everything sent before it.
    Barrier,
}

/// The directory actor.
#[derive(Debug)]
pub struct DirectoryActor;

impl DurableActor for DirectoryActor {
    type Msg = DirectoryMsg;
    type State = Listing;

    fn init(&self, _key: &str) -> Listing {
        Listing::default()
    }

    async fn handle(
        &self,
        _ctx: &mut Context<DirectoryMsg>,
        s: &mut Listing,
        msg: DirectoryMsg,
    ) -> std::result::Result<(), HandlerError> {
        match msg {
            DirectoryMsg::OpenSession { id, limit } => {
                if s.open.contains(&id) || s.open.len() < limit as usize {
                    s.open.insert(id.clone());
                    s.sessions.insert(id);
                }
            }
            DirectoryMsg::CloseSession(id) => {
                s.open.remove(&id);
            }
            DirectoryMsg::Call(id) => {
                s.calls.insert(id);
            }
            DirectoryMsg::Clear => *s = Listing::default(),
            DirectoryMsg::Barrier => {}
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
    pub(crate) async fn open(rt: &Runtime) -> Result<Self> {
        let mut options = RegistryOptions::new("directory");
        options.passivate_after_ms = Some(60_000);
        Ok(Self {
            registry: rt.registry(DirectoryActor, options).await?,
        })
    }

    /// Records `msg` for `tenant` (durable on return; handled in order with later ones).
    pub(crate) async fn note(&self, tenant: &str, msg: DirectoryMsg) -> Result<()> {
        self.registry.send(tenant, &msg).await?;
        Ok(())
    }

    /// What `tenant` has, once everything noted before is handled.
    pub(crate) async fn list(&self, tenant: &str) -> Result<Listing> {
        let seq = self.registry.send(tenant, &DirectoryMsg::Barrier).await?;
        self.registry.wait_handled(tenant, seq).await?;
        Ok(self.registry.state(tenant).await?)
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

    pub(crate) async fn clear(&self, tenant: &str) -> Result<()> {
        let seq = self.registry.send(tenant, &DirectoryMsg::Clear).await?;
        self.registry.wait_handled(tenant, seq).await?;
        Ok(())
    }
}
