//! Who owns a shard, as an epoch in Redis: a node takes a shard only by a compare-and-set
//! that bumps the shard's epoch, and only while it holds its lease and no other live
//! incarnation holds the shard.
//!
//! `soma:{<cluster>}:shard:<n>` is a hash `{epoch, node, incarnation}`: the shard's current
//! epoch and the incarnation that holds it (`node` empty once released). A shard is free when
//! it was never taken, was released, or its holder's lease is gone (it crashed, or its lease
//! expired while it was paused): the lease keys of [`crate::Membership`] are the liveness
//! test, so a shard of a node whose lease expired can be taken at once, and a shard of a live
//! node only after it released it (a hand-off). The epoch is what the journal's fencing
//! compares: a write carrying an older epoch is refused.

use std::sync::LazyLock;

use redis::Script;
use soma_supervision::{Epoch, KeyRange};

use crate::membership::Membership;
use crate::{Error, NodeName, Result};

/// Metric: shards taken by this node (`how`: `free`, `released`, `expired`).
pub const ACQUIRED: &str = "soma_cluster_shards_acquired_total";
/// Metric: shards this node released.
pub const RELEASED: &str = "soma_cluster_shards_released_total";

/// Takes a shard: `{1, epoch, how}`; `{0, epoch, node, incarnation}` when another live
/// incarnation holds it; `{-1}` when the caller does not hold its own lease.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {-1} end
        local cur = redis.call('HMGET', KEYS[1], 'epoch', 'node', 'incarnation')
        local epoch = tonumber(cur[1]) or 0
        local how = 'free'
        if cur[2] and cur[2] ~= '' then
            local mine = cur[2] == ARGV[1] and cur[3] == ARGV[2]
            if mine then
                return {1, epoch, 'held'}
            end
            if redis.call('GET', ARGV[3] .. cur[2]) == cur[3] then
                return {0, epoch, cur[2], cur[3]}
            end
            how = 'expired'
        elseif cur[1] then
            how = 'released'
        end
        epoch = epoch + 1
        redis.call('HSET', KEYS[1], 'epoch', epoch, 'node', ARGV[1], 'incarnation', ARGV[2])
        return {1, epoch, how}
        ",
    )
});

/// Gives a shard up if this incarnation holds it at `epoch`: 1, else 0.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local cur = redis.call('HMGET', KEYS[1], 'epoch', 'node', 'incarnation')
        if cur[1] ~= ARGV[3] or cur[2] ~= ARGV[1] or cur[3] ~= ARGV[2] then return 0 end
        redis.call('HSET', KEYS[1], 'node', '')
        return 1
        ",
    )
});

/// A shard's holder, as Redis has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The shard's current epoch (0: never taken).
    pub epoch: Epoch,
    /// The incarnation that holds it, if one does (it may have crashed since).
    pub node: Option<(NodeName, u64)>,
}

/// How a shard came to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Nobody had taken it before.
    Free,
    /// Its holder had released it (a hand-off).
    Released,
    /// Its holder's lease had expired (a failover).
    Expired,
    /// This incarnation already held it (the epoch is unchanged).
    Held,
}

impl Taken {
    /// The word the acquire script and the `how` label of the metric use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Held => "held",
        }
    }
}

/// The shard table of one cluster, used through a node's [`Membership`].
#[derive(Debug, Clone)]
pub struct Shards {
    membership: Membership,
}

impl Shards {
    /// The shard table, acting as `membership`'s incarnation.
    pub fn new(membership: Membership) -> Self {
        Self { membership }
    }

    /// Takes `shard` for this incarnation: its new epoch, or the epoch it already held.
    /// [`Error::ShardHeld`] while another live incarnation holds it; [`Error::LeaseLost`]
    /// unless this incarnation holds its lease.
    #[tracing::instrument(skip(self), fields(node = %self.membership.node(), shard = shard.0))]
    pub async fn acquire(&self, shard: KeyRange) -> Result<(Epoch, Taken)> {
        let m = &self.membership;
        let keys = m.keys();
        let reply: Vec<redis::Value> = ACQUIRE
            .key(keys.shard(shard))
            .key(keys.lease(m.node()))
            .arg(m.node().as_str())
            .arg(m.incarnation())
            .arg(keys.lease_prefix())
            .invoke_async(&mut m.connection())
            .await
            .map_err(Error::redis)?;
        let int = |v: Option<&redis::Value>| -> Result<i64> {
            match v {
                Some(redis::Value::Int(i)) => Ok(*i),
                other => Err(Error::Redis(format!("unexpected acquire reply {other:?}"))),
            }
        };
        let text = |v: Option<&redis::Value>| -> Result<String> {
            match v {
                Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
                other => Err(Error::Redis(format!("unexpected acquire reply {other:?}"))),
            }
        };
        match int(reply.first())? {
            1 => {
                let epoch = int(reply.get(1))? as Epoch;
                let word = text(reply.get(2))?;
                let taken = [Taken::Free, Taken::Released, Taken::Expired]
                    .into_iter()
                    .find(|t| t.as_str() == word)
                    .unwrap_or(Taken::Held);
                if taken != Taken::Held {
                    let how = taken.as_str();
                    metrics::counter!(ACQUIRED, "how" => how).increment(1);
                    tracing::info!(epoch, how, "shard acquired");
                }
                Ok((epoch, taken))
            }
            0 => {
                let holder = NodeName::new(&text(reply.get(2))?)?;
                let incarnation = text(reply.get(3))?.parse().unwrap_or(0);
                Err(Error::ShardHeld {
                    shard,
                    holder,
                    incarnation,
                })
            }
            _ => Err(Error::LeaseLost {
                node: m.node().clone(),
                incarnation: m.incarnation(),
            }),
        }
    }

    /// Gives `shard` up (held at `epoch`); [`Error::NotHolder`] unless this incarnation
    /// holds it at that epoch. The epoch stays, so the next holder's is higher.
    #[tracing::instrument(skip(self), fields(node = %self.membership.node(), shard = shard.0, epoch))]
    pub async fn release(&self, shard: KeyRange, epoch: Epoch) -> Result<()> {
        let m = &self.membership;
        let done: i64 = RELEASE
            .key(m.keys().shard(shard))
            .arg(m.node().as_str())
            .arg(m.incarnation())
            .arg(epoch)
            .invoke_async(&mut m.connection())
            .await
            .map_err(Error::redis)?;
        if done == 1 {
            metrics::counter!(RELEASED).increment(1);
            tracing::info!("shard released");
            Ok(())
        } else {
            Err(Error::NotHolder { shard, epoch })
        }
    }

    /// The shard's holder as Redis has it now.
    pub async fn holder(&self, shard: KeyRange) -> Result<Holder> {
        let m = &self.membership;
        let (epoch, node, incarnation): (Option<u64>, Option<String>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(m.keys().shard(shard))
                .arg("epoch")
                .arg("node")
                .arg("incarnation")
                .query_async(&mut m.connection())
                .await
                .map_err(Error::redis)?;
        let node = match (node.filter(|n| !n.is_empty()), incarnation) {
            (Some(n), Some(i)) => Some((NodeName::new(&n)?, i)),
            _ => None,
        };
        Ok(Holder {
            epoch: epoch.unwrap_or(0),
            node,
        })
    }
}
