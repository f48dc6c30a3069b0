//! Vector memory: points (id, vector, JSON payload) per tenant, searched by cosine similarity
//! with a payload filter.
//!
//! Tenant isolation is the adapter's: a point's stored id is derived from (tenant, id), its
//! tenant is written into its payload under a reserved key, and every read, search, count
//! and delete filters on it. Callers cannot name another tenant's points, and payload keys
//! starting with `_soma` are refused.

#[cfg(any(test, feature = "test-util"))]
pub mod contract;
mod edge;
#[cfg(feature = "qdrant")]
mod qdrant;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::episodic::check_id;
use crate::error::{Error, Result};

pub use self::edge::EdgeVectors;
#[cfg(feature = "qdrant")]
pub use self::qdrant::{QdrantConfig, QdrantVectors};

/// The payload key holding a point's tenant.
pub(crate) const TENANT_KEY: &str = "_soma_tenant";
/// The payload key holding a point's id as the caller gave it.
pub(crate) const ID_KEY: &str = "_soma_id";
/// The most results one search returns.
pub const MAX_K: usize = 1000;

/// A point as stored and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The caller's id (1-256 bytes, unique per tenant).
    pub id: String,
    /// The vector (the memory's dimension, finite values).
    pub vector: Vec<f32>,
    /// Anything, as a JSON object (keys starting with `_soma` are reserved).
    pub payload: Map<String, Value>,
}

/// A search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The point's id.
    pub id: String,
    /// Cosine similarity to the query (higher is closer).
    pub score: f32,
    /// The point's payload.
    pub payload: Map<String, Value>,
}

/// A value a payload field is matched against.
#[derive(Debug, Clone, PartialEq)]
pub enum MatchValue {
    /// An exact string.
    Keyword(String),
    /// An exact integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
}

/// One condition on a payload field.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The field equals the value (for an array field: one element does).
    Equals {
        /// The field (dots reach into objects: `meta.source`).
        key: String,
        /// The value.
        value: MatchValue,
    },
    /// The field equals one of the values.
    AnyOf {
        /// The field.
        key: String,
        /// The values (keywords).
        values: Vec<String>,
    },
    /// The field is a number within the bounds (inclusive; `None` is open).
    Range {
        /// The field.
        key: String,
        /// Lower bound.
        min: Option<f64>,
        /// Upper bound.
        max: Option<f64>,
    },
}

/// Every condition must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    /// The conditions.
    pub must: Vec<Condition>,
}

impl Filter {
    /// A filter of one `Equals` condition on a keyword.
    pub fn keyword(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            must: vec![Condition::Equals {
                key: key.into(),
                value: MatchValue::Keyword(value.into()),
            }],
        }
    }

    /// This filter and one more condition.
    pub fn and(mut self, condition: Condition) -> Self {
        self.must.push(condition);
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        for c in &self.must {
            let key = match c {
                Condition::Equals { key, .. }
                | Condition::AnyOf { key, .. }
                | Condition::Range { key, .. } => key,
            };
            check_payload_key(key)?;
            if let Condition::Range { min, max, .. } = c
                && min.iter().chain(max.iter()).any(|v| !v.is_finite())
            {
                return Err(Error::Invalid {
                    what: "filter range",
                    value: key.clone(),
                    reason: "has a bound that is not a finite number",
                });
            }
        }
        Ok(())
    }
}

fn check_payload_key(key: &str) -> Result<()> {
    check_id("payload key", key)?;
    if key.starts_with("_soma") {
        return Err(Error::Invalid {
            what: "payload key",
            value: key.chars().take(64).collect(),
            reason: "starts with _soma, which is reserved",
        });
    }
    Ok(())
}

/// Checks a point against the memory's dimension.
pub(crate) fn check_point(point: &Point, dimension: usize) -> Result<()> {
    check_id("point id", &point.id)?;
    check_vector(&point.vector, dimension)?;
    for key in point.payload.keys() {
        check_payload_key(key)?;
    }
    Ok(())
}

pub(crate) fn check_vector(vector: &[f32], dimension: usize) -> Result<()> {
    if vector.len() != dimension {
        return Err(Error::Dimension {
            expected: dimension,
            found: vector.len(),
        });
    }
    if vector.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid {
            what: "vector",
            value: format!("{} values", vector.len()),
            reason: "holds a value that is not a finite number",
        });
    }
    if vector.iter().all(|v| *v == 0.0) {
        return Err(Error::Invalid {
            what: "vector",
            value: format!("{} values", vector.len()),
            reason: "is all zeros (it has no direction for cosine similarity)",
        });
    }
    Ok(())
}

pub(crate) fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > MAX_K {
        return Err(Error::Invalid {
            what: "k",
            value: k.to_string(),
            reason: "must be between 1 and 1000",
        });
    }
    Ok(())
}

/// The stored id of a tenant's point: a name-based UUID (v5) of the length-prefixed tenant
/// and id, so the same id under two tenants are two points.
pub(crate) fn point_uuid(tenant: &str, id: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(4 + tenant.len() + id.len());
    name.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
    name.extend_from_slice(tenant.as_bytes());
    name.extend_from_slice(&(id.len() as u16).to_be_bytes());
    name.extend_from_slice(id.as_bytes());
    uuid::Uuid::new_v5(&NAMESPACE, &name)
}

/// The namespace of SomaAgent's point ids.
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5a6f_d1c2_7b3e_4f80_9a1b_2c3d_4e5f_6071);

/// The payload as stored: the caller's, plus the reserved tenant and id.
pub(crate) fn stored_payload(tenant: &str, point: &Point) -> Map<String, Value> {
    let mut p = point.payload.clone();
    p.insert(TENANT_KEY.into(), Value::String(tenant.into()));
    p.insert(ID_KEY.into(), Value::String(point.id.clone()));
    p
}

/// The caller's id and payload of a stored payload, if it belongs to `tenant`.
pub(crate) fn caller_payload(
    tenant: &str,
    mut p: Map<String, Value>,
) -> Option<(String, Map<String, Value>)> {
    let owner = p.remove(TENANT_KEY)?;
    if owner.as_str() != Some(tenant) {
        return None;
    }
    match p.remove(ID_KEY)? {
        Value::String(id) => Some((id, p)),
        _ => None,
    }
}

/// Vector memory.
#[async_trait]
pub trait VectorMemory: Send + Sync + std::fmt::Debug + 'static {
    /// The dimension every vector must have.
    fn dimension(&self) -> usize;

    /// Inserts or replaces points of `tenant`; durable on return.
    async fn upsert(&self, tenant: &str, points: Vec<Point>) -> Result<()>;

    /// The `k` points of `tenant` closest to `vector` that pass `filter`, closest first.
    async fn search(
        &self,
        tenant: &str,
        vector: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<Hit>>;

    /// The points of `tenant` with these ids (missing ones are left out), in the ids' order.
    async fn get(&self, tenant: &str, ids: &[String]) -> Result<Vec<Point>>;

    /// Deletes points of `tenant` by id; returns how many existed.
    async fn delete(&self, tenant: &str, ids: &[String]) -> Result<u64>;

    /// How many points of `tenant` pass `filter`.
    async fn count(&self, tenant: &str, filter: Option<&Filter>) -> Result<u64>;

    /// Deletes every point of `tenant` (right to erasure); returns how many.
    async fn erase_tenant(&self, tenant: &str) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Different (tenant, id) pairs never share a stored id, even when their
        /// concatenations are equal.
        #[test]
        fn stored_ids_are_distinct(a in "[a-z]{1,6}", b in "[a-z]{1,6}", c in "[a-z]{1,6}", d in "[a-z]{1,6}") {
            prop_assume!((a.as_str(), b.as_str()) != (c.as_str(), d.as_str()));
            prop_assert_ne!(point_uuid(&a, &b), point_uuid(&c, &d));
        }
    }

    #[test]
    fn reserved_keys_and_foreign_tenants_are_refused() {
        let mut payload = Map::new();
        payload.insert("_soma_tenant".into(), Value::String("other".into()));
        let p = Point {
            id: "1".into(),
            vector: vec![1.0, 0.0],
            payload,
        };
        assert!(check_point(&p, 2).is_err());
        let ok = Point {
            id: "1".into(),
            vector: vec![1.0, 0.0],
            payload: Map::new(),
        };
        let stored = stored_payload("acme", &ok);
        assert!(caller_payload("other", stored.clone()).is_none());
        assert_eq!(
            caller_payload("acme", stored),
            Some(("1".into(), Map::new()))
        );
        assert!(check_vector(&[0.0, 0.0], 2).is_err());
        assert!(check_vector(&[f32::NAN, 1.0], 2).is_err());
        assert!(check_vector(&[1.0], 2).is_err());
    }
}
