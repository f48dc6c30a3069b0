//! The membership table's Redis commands: every change is one Lua script, so that a check
//! of the lease and the write it guards are one atomic step.

use std::pin::Pin;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::Script;
use redis::aio::ConnectionManager;

use super::{Keys, Member, NodeState, millis};
use crate::{Error, NodeName, Result};

/// Takes the lease if no incarnation holds it and writes the row: `{1}`, or `{0, pttl}`.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
            return {0, redis.call('PTTL', KEYS[1])}
        end
        redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
        redis.call('PUBLISH', KEYS[3], ARGV[4])
        return {1}
        ",
    )
});

/// Extends the lease if this incarnation holds it.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
        return 1
        ",
    )
});

/// Writes this incarnation's row (and drops its lease, with `ARGV[4] == '1'`) if it holds
/// the lease. A leave whose reply was lost and is sent again finds the lease gone and its
/// own row written: that is a success too.
static SET_STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then
            if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 0
                and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then
                return 1
            end
            return 0
        end
        redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
        if ARGV[4] == '1' then redis.call('DEL', KEYS[1]) end
        redis.call('PUBLISH', KEYS[3], ARGV[3])
        return 1
        ",
    )
});

/// Marks a member down if its lease is gone and its row is still the one the caller read.
static MARK_DOWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
        if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
        redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
        redis.call('PUBLISH', KEYS[3], ARGV[3])
        return 1
        ",
    )
});

fn json(member: &Member) -> String {
    // A `Member` has no map with non-string keys and no float: it always serialises.
    serde_json::to_string(member).unwrap_or_default()
}

/// `None` once joined; `Some(wait)` while an earlier incarnation holds the lease.
pub(super) async fn join(
    conn: &mut ConnectionManager,
    keys: &Keys,
    member: &Member,
    lease: Duration,
) -> Result<Option<Duration>> {
    let reply: Vec<i64> = JOIN
        .key(keys.lease(&member.name))
        .key(keys.members())
        .key(keys.events())
        .arg(member.incarnation)
        .arg(millis(lease))
        .arg(member.name.as_str())
        .arg(json(member))
        .invoke_async(conn)
        .await
        .map_err(Error::redis)?;
    Ok(match reply.as_slice() {
        [1] => None,
        // No expiry (-1) should not happen; wait one lease rather than spin.
        [0, -1] => Some(lease),
        [0, pttl] => Some(Duration::from_millis((*pttl).max(0) as u64)),
        _ => return Err(Error::Redis(format!("unexpected join reply {reply:?}"))),
    })
}

pub(super) async fn renew(
    conn: &mut ConnectionManager,
    keys: &Keys,
    node: &NodeName,
    incarnation: u64,
    lease: Duration,
) -> Result<bool> {
    let held: i64 = RENEW
        .key(keys.lease(node))
        .arg(incarnation)
        .arg(millis(lease))
        .invoke_async(conn)
        .await
        .map_err(Error::redis)?;
    Ok(held == 1)
}

pub(super) async fn set_state(
    conn: &mut ConnectionManager,
    keys: &Keys,
    member: &Member,
    drop_lease: bool,
) -> Result<bool> {
    let held: i64 = SET_STATE
        .key(keys.lease(&member.name))
        .key(keys.members())
        .key(keys.events())
        .arg(member.incarnation)
        .arg(member.name.as_str())
        .arg(json(member))
        .arg(if drop_lease { "1" } else { "0" })
        .invoke_async(conn)
        .await
        .map_err(Error::redis)?;
    Ok(held == 1)
}

/// Marks `seen` (read as `raw`) down if its lease expired and nobody changed its row since.
pub(super) async fn mark_down(
    conn: &mut ConnectionManager,
    keys: &Keys,
    raw: &str,
    seen: &Member,
) -> Result<bool> {
    let down = Member {
        state: NodeState::Down,
        since_ms: super::now_ms(),
        ..seen.clone()
    };
    let done: i64 = MARK_DOWN
        .key(keys.lease(&seen.name))
        .key(keys.members())
        .key(keys.events())
        .arg(seen.name.as_str())
        .arg(raw)
        .arg(json(&down))
        .invoke_async(conn)
        .await
        .map_err(Error::redis)?;
    Ok(done == 1)
}

/// Every row, raw and parsed; a row that does not parse is [`Error::BadMember`].
pub(crate) async fn read_members(
    conn: &mut ConnectionManager,
    keys: &Keys,
) -> Result<Vec<(String, Member)>> {
    let rows: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.members())
        .query_async(conn)
        .await
        .map_err(Error::redis)?;
    rows.into_iter()
        .map(|(name, raw)| match serde_json::from_str::<Member>(&raw) {
            Ok(m) if m.name.as_str() == name => Ok((raw, m)),
            Ok(m) => Err(Error::BadMember {
                node: name,
                detail: format!("row names node {}", m.name),
            }),
            Err(e) => Err(Error::BadMember {
                node: name,
                detail: e.to_string(),
            }),
        })
        .collect()
}

/// The table's change notifications.
pub(super) type Events = Option<Pin<Box<dyn Stream<Item = redis::Msg> + Send>>>;

/// Subscribes to the table's changes; `None` while Redis cannot be reached (the renewals go
/// on reading the table).
pub(super) async fn subscribe(url: &str, keys: &Keys) -> Events {
    let client = redis::Client::open(url).ok()?;
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(keys.events()).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Ok(pubsub)) => Some(Box::pin(pubsub.into_on_message())),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "membership events not subscribed");
            None
        }
        Err(_) => None,
    }
}

/// Waits for the next change: `true` on a change, `false` when the subscription ended
/// (never returns without one).
pub(super) async fn next_event(events: &mut Events) -> bool {
    match events {
        Some(stream) => stream.next().await.is_some(),
        None => std::future::pending().await,
    }
}
