//! What a tenant has, by id: a durable actor per tenant (registry `directory`) listing its
//! sessions and tool calls, so that erasing the tenant can find every one of them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use soma_supervision::{Context, DurableActor, HandlerError, Registry, RegistryOptions, Runtime};

use crate::error::Result;

/// A tenant's entities.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Listing {
    /// Session ids.
    pub sessions: BTreeSet<String>,
    /// Tool-call ids.
    pub calls: BTreeSet<String>,
}

/// The directory actor's messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DirectoryMsg {
    /// A session was opened.
    Session(String),
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
            DirectoryMsg::Session(id) => {
                s.sessions.insert(id);
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

    pub(crate) async fn clear(&self, tenant: &str) -> Result<()> {
        let seq = self.registry.send(tenant, &DirectoryMsg::Clear).await?;
        self.registry.wait_handled(tenant, seq).await?;
        Ok(())
    }
}
