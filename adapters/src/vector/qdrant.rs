//! Vector memory on a Qdrant server through qdrant-client (gRPC): one collection, tenants
//! separated by an `is_tenant` keyword index on the reserved tenant key.

use std::collections::HashMap;

use async_trait::async_trait;
use qdrant_client::qdrant::{
    Condition as QCondition, CountPointsBuilder, CreateCollectionBuilder,
    CreateFieldIndexCollectionBuilder, DeletePointsBuilder, Distance, FieldType, Filter as QFilter,
    GetPointsBuilder, KeywordIndexParamsBuilder, PointId, PointStruct, PointsIdsList, Range,
    SearchPointsBuilder, UpsertPointsBuilder, Value as QValue, VectorParamsBuilder, vector_output,
    vectors_output,
};
use qdrant_client::{Payload, Qdrant};
use serde_json::{Map, Value};

use super::{
    Condition, Filter, Hit, MatchValue, Point, TENANT_KEY, VectorMemory, caller_payload, check_k,
    check_point, check_vector, point_uuid, stored_payload,
};
use crate::episodic::check_id;
use crate::error::{Error, Result};

/// How to reach the Qdrant server (`api_key` is a secret: never logged).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QdrantConfig {
    /// The gRPC URL (`http://host:6334`).
    pub url: String,
    /// The API key, if the server wants one. Never logged.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The collection (created when missing).
    pub collection: String,
    /// The vectors' dimension.
    pub dimension: usize,
}

impl std::fmt::Debug for QdrantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantConfig")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "hidden"))
            .field("collection", &self.collection)
            .field("dimension", &self.dimension)
            .finish()
    }
}

/// [`VectorMemory`] on a Qdrant server (feature `qdrant`).
pub struct QdrantVectors {
    client: Qdrant,
    config: QdrantConfig,
}

impl std::fmt::Debug for QdrantVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantVectors")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Host and port of a URL, without anything that could be a credential.
fn address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or_default().to_owned()
}

impl QdrantVectors {
    /// Connects, and creates the collection (cosine, `dimension`) and its tenant index when
    /// missing.
    pub async fn connect(config: QdrantConfig) -> Result<Self> {
        check_id("collection", &config.collection)?;
        let server = |e: qdrant_client::QdrantError| Error::Server {
            server: "qdrant",
            address: address(&config.url),
            detail: e.to_string(),
        };
        let client = Qdrant::from_url(&config.url)
            .api_key(config.api_key.clone())
            .build()
            .map_err(server)?;
        if !client
            .collection_exists(&config.collection)
            .await
            .map_err(server)?
        {
            client
                .create_collection(
                    CreateCollectionBuilder::new(&config.collection).vectors_config(
                        VectorParamsBuilder::new(config.dimension as u64, Distance::Cosine),
                    ),
                )
                .await
                .map_err(server)?;
            client
                .create_field_index(
                    CreateFieldIndexCollectionBuilder::new(
                        &config.collection,
                        TENANT_KEY,
                        FieldType::Keyword,
                    )
                    .field_index_params(KeywordIndexParamsBuilder::default().is_tenant(true))
                    .wait(true),
                )
                .await
                .map_err(server)?;
        }
        Ok(Self { client, config })
    }

    fn error(&self, e: qdrant_client::QdrantError) -> Error {
        Error::Server {
            server: "qdrant",
            address: address(&self.config.url),
            detail: e.to_string(),
        }
    }

    fn id(tenant: &str, id: &str) -> PointId {
        PointId::from(point_uuid(tenant, id).to_string())
    }
}

fn filter(tenant: &str, filter: Option<&Filter>) -> QFilter {
    let mut must = vec![QCondition::matches(TENANT_KEY, tenant.to_owned())];
    for c in filter.map(|f| f.must.as_slice()).unwrap_or_default() {
        must.push(match c {
            Condition::Equals { key, value } => match value {
                MatchValue::Keyword(s) => QCondition::matches(key.as_str(), s.clone()),
                MatchValue::Integer(i) => QCondition::matches(key.as_str(), *i),
                MatchValue::Bool(b) => QCondition::matches(key.as_str(), *b),
            },
            Condition::AnyOf { key, values } => QCondition::matches(key.as_str(), values.clone()),
            Condition::Range { key, min, max } => QCondition::range(
                key.as_str(),
                Range {
                    gte: *min,
                    lte: *max,
                    ..Default::default()
                },
            ),
        });
    }
    QFilter::must(must)
}

fn json(payload: HashMap<String, QValue>) -> Map<String, Value> {
    payload.into_iter().map(|(k, v)| (k, v.into())).collect()
}

#[async_trait]
impl VectorMemory for QdrantVectors {
    fn dimension(&self) -> usize {
        self.config.dimension
    }

    async fn upsert(&self, tenant: &str, points: Vec<Point>) -> Result<()> {
        check_id("tenant", tenant)?;
        for p in &points {
            check_point(p, self.config.dimension)?;
        }
        let structs: Vec<PointStruct> = points
            .iter()
            .map(|p| {
                PointStruct::new(
                    Self::id(tenant, &p.id),
                    p.vector.clone(),
                    Payload::from(stored_payload(tenant, p)),
                )
            })
            .collect();
        self.client
            .upsert_points(UpsertPointsBuilder::new(&self.config.collection, structs).wait(true))
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn search(
        &self,
        tenant: &str,
        vector: &[f32],
        k: usize,
        f: Option<&Filter>,
    ) -> Result<Vec<Hit>> {
        check_id("tenant", tenant)?;
        check_vector(vector, self.config.dimension)?;
        check_k(k)?;
        if let Some(f) = f {
            f.check()?;
        }
        let found = self
            .client
            .search_points(
                SearchPointsBuilder::new(&self.config.collection, vector.to_vec(), k as u64)
                    .filter(filter(tenant, f))
                    .with_payload(true),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(found
            .result
            .into_iter()
            .filter_map(|p| {
                let (id, payload) = caller_payload(tenant, json(p.payload))?;
                Some(Hit {
                    id,
                    score: p.score,
                    payload,
                })
            })
            .collect())
    }

    async fn get(&self, tenant: &str, ids: &[String]) -> Result<Vec<Point>> {
        check_id("tenant", tenant)?;
        for id in ids {
            check_id("point id", id)?;
        }
        let wanted: Vec<PointId> = ids.iter().map(|id| Self::id(tenant, id)).collect();
        let got = self
            .client
            .get_points(
                GetPointsBuilder::new(&self.config.collection, wanted)
                    .with_payload(true)
                    .with_vectors(true),
            )
            .await
            .map_err(|e| self.error(e))?;
        let mut by_id: HashMap<String, Point> = got
            .result
            .into_iter()
            .filter_map(|r| {
                let vector = match r.vectors?.vectors_options? {
                    vectors_output::VectorsOptions::Vector(v) => match v.vector? {
                        vector_output::Vector::Dense(d) => d.data,
                        _ => return None,
                    },
                    vectors_output::VectorsOptions::Vectors(_) => return None,
                };
                let (id, payload) = caller_payload(tenant, json(r.payload))?;
                Some((
                    id.clone(),
                    Point {
                        id,
                        vector,
                        payload,
                    },
                ))
            })
            .collect();
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    async fn delete(&self, tenant: &str, ids: &[String]) -> Result<u64> {
        let existing = self.get(tenant, ids).await?;
        if existing.is_empty() {
            return Ok(0);
        }
        let list = PointsIdsList {
            ids: existing.iter().map(|p| Self::id(tenant, &p.id)).collect(),
        };
        self.client
            .delete_points(
                DeletePointsBuilder::new(&self.config.collection)
                    .points(list)
                    .wait(true),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(existing.len() as u64)
    }

    async fn count(&self, tenant: &str, f: Option<&Filter>) -> Result<u64> {
        check_id("tenant", tenant)?;
        if let Some(f) = f {
            f.check()?;
        }
        let got = self
            .client
            .count(
                CountPointsBuilder::new(&self.config.collection)
                    .filter(filter(tenant, f))
                    .exact(true),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(got.result.map_or(0, |r| r.count))
    }

    async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        let n = self.count(tenant, None).await?;
        self.client
            .delete_points(
                DeletePointsBuilder::new(&self.config.collection)
                    .points(filter(tenant, None))
                    .wait(true),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_never_carry_credentials() {
        assert_eq!(
            super::address("https://user:secret@q.example:6334/x"),
            "q.example:6334"
        );
        assert_eq!(super::address("http://127.0.0.1:6334"), "127.0.0.1:6334");
    }
}
