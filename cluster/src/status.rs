//! The operator's view of a cluster, read from Redis without joining it: the members, how
//! long each lease has left, and who holds which shard.

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use serde::Serialize;

use crate::membership::{Keys, connect, scripts};
use crate::{Error, Member, Result};

/// One member as the status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// Its row in the table.
    #[serde(flatten)]
    pub member: Member,
    /// What its lease has left (`None`: no lease, the node is gone or left).
    pub lease_left_ms: Option<u64>,
    /// Shards its current incarnation holds.
    pub shards: usize,
}

/// A cluster's state as Redis holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The cluster's name.
    pub cluster: String,
    /// The shards looked at (`0..shards`).
    pub shards: u32,
    /// Every member, by name.
    pub members: Vec<MemberStatus>,
    /// Shards held by no live incarnation (never taken, released, or their holder's lease
    /// gone).
    pub unowned: usize,
}

/// Reads the status of `cluster` on the Redis at `redis_url` (shards `0..shards`).
pub async fn status(redis_url: &str, cluster: &str, shards: u32) -> Result<Status> {
    let mut conn = connect(
        redis_url,
        ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(5)),
    )
    .await?;
    let keys = Keys::of(cluster);
    let rows = scripts::read_members(&mut conn, &keys).await?;
    let mut pipe = redis::pipe();
    for (_, m) in &rows {
        pipe.cmd("PTTL").arg(keys.lease(&m.name));
        pipe.cmd("GET").arg(keys.lease(&m.name));
    }
    let leases: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(Error::redis)?;
    let mut pipe = redis::pipe();
    for s in 0..shards {
        pipe.cmd("HMGET")
            .arg(keys.shard(soma_supervision::KeyRange(s)))
            .arg("node")
            .arg("incarnation");
    }
    let holders: Vec<(Option<String>, Option<u64>)> =
        pipe.query_async(&mut conn).await.map_err(Error::redis)?;
    let mut members: Vec<MemberStatus> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (_, member))| {
            let live = match (leases.get(2 * i), leases.get(2 * i + 1)) {
                (Some(redis::Value::Int(ms)), Some(redis::Value::BulkString(inc)))
                    if *ms >= 0 && inc.as_slice() == member.incarnation.to_string().as_bytes() =>
                {
                    Some(*ms as u64)
                }
                _ => None,
            };
            MemberStatus {
                member,
                lease_left_ms: live,
                shards: 0,
            }
        })
        .collect();
    let mut unowned = 0;
    for (node, incarnation) in holders {
        let holder = members.iter_mut().find(|m| {
            m.lease_left_ms.is_some()
                && node.as_deref() == Some(m.member.name.as_str())
                && incarnation == Some(m.member.incarnation)
        });
        match holder {
            Some(m) => m.shards += 1,
            None => unowned += 1,
        }
    }
    members.sort_by(|a, b| a.member.name.cmp(&b.member.name));
    Ok(Status {
        cluster: cluster.to_owned(),
        shards,
        members,
        unowned,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "cluster {}: {} member(s), {} shard(s), {} unowned",
            self.cluster,
            self.members.len(),
            self.shards,
            self.unowned
        )?;
        writeln!(
            f,
            "{:<24} {:>11} {:<9} {:>10} {:>7}  addr",
            "node", "incarnation", "state", "lease left", "shards"
        )?;
        for m in &self.members {
            let lease = m
                .lease_left_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"));
            writeln!(
                f,
                "{:<24} {:>11} {:<9} {:>10} {:>7}  {}",
                m.member.name,
                m.member.incarnation,
                m.member.state.as_str(),
                lease,
                m.shards,
                m.member.addr
            )?;
        }
        Ok(())
    }
}
