//! Episodic memory on a Redis server: one sorted set per (tenant, session), scored by time,
//! written with atomic pipelines through a reconnecting connection manager.
//!
//! Durability is the server's: run it with `appendonly yes` (and `appendfsync always` for
//! no loss of acknowledged entries on a server crash).

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Entry, EpisodicMemory, Scope, Stored, check_id};
use crate::error::{Error, Result};

/// [`EpisodicMemory`] on Redis.
#[derive(Clone)]
pub struct RedisEpisodic {
    conn: ConnectionManager,
    address: String,
    namespace: String,
}

impl std::fmt::Debug for RedisEpisodic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEpisodic")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn part(out: &mut String, value: &str) {
    out.push_str(&value.len().to_string());
    out.push(':');
    out.push_str(value);
    out.push(':');
}

impl RedisEpisodic {
    /// Connects to `url` (`redis://host:port/db`, credentials allowed, never logged). Keys
    /// live under `namespace`. Calls fail with [`Error::Server`] while the server is down and
    /// work again once it is back (the connection manager reconnects with backoff).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        check_id("namespace", namespace)?;
        let client = redis::Client::open(url).map_err(|e| Error::Invalid {
            what: "redis url",
            value: "(hidden)".into(),
            reason: if e.is_io_error() {
                "cannot be reached"
            } else {
                "is not a valid redis:// URL"
            },
        })?;
        let address = client.get_connection_info().addr.to_string();
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_max_delay(1_000)
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(5));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| server(&address, e))?;
        tracing::info!(address = %address, namespace, "episodic memory on redis");
        Ok(Self {
            conn,
            address,
            namespace: namespace.to_string(),
        })
    }

    fn scope_key(&self, scope: &Scope) -> String {
        let mut k = format!("{}:s:", self.namespace);
        part(&mut k, scope.tenant());
        part(&mut k, scope.session());
        k
    }

    fn tenant_key(&self, tenant: &str) -> String {
        let mut k = format!("{}:t:", self.namespace);
        part(&mut k, tenant);
        k
    }

    fn scopes_key(&self) -> String {
        format!("{}:scopes", self.namespace)
    }

    fn err(&self, e: redis::RedisError) -> Error {
        server(&self.address, e)
    }

    fn decode(&self, member: &str) -> Result<Stored> {
        let corrupt = |detail: String| Error::Corrupt {
            path: format!("redis://{}", self.address).into(),
            detail,
        };
        let (id, json) = member
            .split_once(':')
            .ok_or_else(|| corrupt(format!("member without id: {:.40}", member)))?;
        let id = id
            .parse()
            .map_err(|_| corrupt(format!("bad id {id:.24}")))?;
        let entry = serde_json::from_str(json).map_err(|e| corrupt(format!("entry {id}: {e}")))?;
        Ok(Stored { id, entry })
    }

    fn decode_all(&self, members: Vec<String>) -> Result<Vec<Stored>> {
        members.iter().map(|m| self.decode(m)).collect()
    }
}

fn server(address: &str, e: redis::RedisError) -> Error {
    Error::Server {
        server: "redis",
        address: address.to_string(),
        detail: e.to_string(),
    }
}

impl RedisEpisodic {
    async fn append_inner(&self, scope: &Scope, entry: Entry) -> Result<u64> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(&entry).map_err(|e| Error::Corrupt {
            path: format!("redis://{}", self.address).into(),
            detail: format!("cannot encode entry: {e}"),
        })?;
        let id: u64 = redis::cmd("INCR")
            .arg(format!("{}:id", self.namespace))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        let key = self.scope_key(scope);
        // The id first, zero-padded: members of equal time sort in append order.
        let member = format!("{id:020}:{json}");
        redis::pipe()
            .atomic()
            .cmd("ZADD")
            .arg(&key)
            .arg(entry.at_ms)
            .arg(member)
            .ignore()
            .cmd("SADD")
            .arg(self.tenant_key(scope.tenant()))
            .arg(&key)
            .ignore()
            .cmd("SADD")
            .arg(self.scopes_key())
            .arg(&key)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(id)
    }
}

#[async_trait]
impl EpisodicMemory for RedisEpisodic {
    #[tracing::instrument(level = "debug", skip(self, entry), fields(backend = "redis", tenant = scope.tenant()))]
    async fn append(&self, scope: &Scope, entry: Entry) -> Result<u64> {
        let started = std::time::Instant::now();
        let id = self.append_inner(scope, entry).await?;
        metrics::counter!("soma_adapters_episodic_appended_total", "backend" => "redis")
            .increment(1);
        metrics::histogram!("soma_adapters_episodic_append_seconds", "backend" => "redis")
            .record(started.elapsed().as_secs_f64());
        Ok(id)
    }

    async fn last(&self, scope: &Scope, n: usize) -> Result<Vec<Stored>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.scope_key(scope))
            .arg(-(n.min(i64::MAX as usize) as i64))
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        self.decode_all(members)
    }

    async fn range(&self, scope: &Scope, from_ms: u64, to_ms: u64) -> Result<Vec<Stored>> {
        if from_ms >= to_ms {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.scope_key(scope))
            .arg(from_ms)
            .arg(format!("({to_ms}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        self.decode_all(members)
    }

    async fn expire_before(&self, cutoff_ms: u64) -> Result<u64> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.scopes_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(format!("({cutoff_ms}"));
        }
        let removed: Vec<u64> = pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
        Ok(removed.iter().sum())
    }

    async fn erase_session(&self, scope: &Scope) -> Result<u64> {
        let mut conn = self.conn.clone();
        let key = self.scope_key(scope);
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .cmd("ZCARD")
            .arg(&key)
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .cmd("SREM")
            .arg(self.scopes_key())
            .arg(&key)
            .ignore()
            .cmd("SREM")
            .arg(self.tenant_key(scope.tenant()))
            .arg(&key)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(count)
    }

    async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        check_id("tenant", tenant)?;
        let mut conn = self.conn.clone();
        let tenant_key = self.tenant_key(tenant);
        let mut erased = 0;
        // Each pass removes exactly the sessions it read from the tenant's set, so a session
        // created by an append racing the erasure stays listed and the next pass takes it.
        loop {
            let keys: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&tenant_key)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.err(e))?;
            if keys.is_empty() {
                return Ok(erased);
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for key in &keys {
                pipe.cmd("ZCARD").arg(key);
            }
            for key in &keys {
                pipe.cmd("DEL").arg(key).ignore();
                pipe.cmd("SREM").arg(self.scopes_key()).arg(key).ignore();
                pipe.cmd("SREM").arg(&tenant_key).arg(key).ignore();
            }
            let counts: Vec<u64> = pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
            erased += counts.iter().sum::<u64>();
        }
    }
}
