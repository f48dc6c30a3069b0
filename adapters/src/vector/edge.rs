//! The embedded vector memory on qdrant-edge (Qdrant's in-process engine).
//!
//! qdrant-edge is synchronous: every call runs on tokio's blocking pool. Writes, flushes and
//! index builds are serialised by one lock (the engine's `flush` must not overlap a write);
//! searches and reads do not wait for it. The engine does not replay its WAL on load, so an
//! upsert returns only after a flush: acknowledged points survive a crash. HNSW indexes are
//! built by `optimize`, which runs in the background after `optimize_after` changed points.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    Condition as QCondition, CountRequest, CreateIndex, DEFAULT_VECTOR_NAME, Distance, EdgeConfig,
    EdgeShard, EdgeVectorParams, FieldCondition, FieldIndexOperations, Filter as QFilter,
    KeywordIndexParams, Match, NamedQuery, PayloadFieldSchema, PayloadSchemaParams, PointId,
    PointInsertOperations, PointOperations, PointStructPersisted, QueryEnum, QueryRequest, Range,
    ScoringQuery, SearchParams, UpdateOperation, VectorStructInternal, WithPayloadInterface,
    WithVector,
};

use super::{
    Condition, Filter, Hit, MatchValue, Point, TENANT_KEY, VectorMemory, caller_payload, check_k,
    check_point, check_vector, point_uuid, stored_payload,
};
use crate::episodic::check_id;
use crate::error::{Error, Result};

/// The default HNSW beam width of searches.
const DEFAULT_EF: usize = 128;

/// [`VectorMemory`] in-process, on qdrant-edge, cosine similarity, one shard per directory.
#[derive(Debug, Clone)]
pub struct EdgeVectors {
    inner: Arc<Inner>,
}

struct Inner {
    shard: EdgeShard,
    path: PathBuf,
    dimension: usize,
    /// Held by writes, flushes and index builds.
    write: Mutex<()>,
    changed: AtomicU64,
    optimize_after: u64,
    optimizing: AtomicBool,
    /// HNSW beam width of searches (0: the engine's default); `usize::MAX`: exact.
    search_ef: AtomicUsize,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeVectors")
            .field("path", &self.path)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

fn engine(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Store {
        path: path.to_path_buf(),
        source: e.to_string().into(),
    }
}

/// Runs an engine call that may panic on damaged files or a broken invariant.
fn guarded<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| Error::Corrupt {
        path: path.to_path_buf(),
        detail: format!("vector engine failed: {}", panic_text(&p)),
    })
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn json_path(path: &Path, key: &str) -> Result<qdrant_edge::JsonPath> {
    key.try_into()
        .map_err(|_| Error::Invalid {
            what: "payload key",
            value: key.chars().take(64).collect(),
            reason: "is not a valid payload path",
        })
        .inspect_err(|_| tracing::debug!(path = %path.display(), key, "bad payload path"))
}

impl EdgeVectors {
    /// Opens (or creates) a memory of `dimension` in directory `path`; an existing memory
    /// of another dimension is an error naming both.
    pub async fn open(path: impl AsRef<Path>, dimension: usize) -> Result<Self> {
        Self::open_with(path, dimension, 20_000).await
    }

    /// As [`open`](Self::open), building indexes after every `optimize_after` changed
    /// points (0: never on its own; call [`optimize`](Self::optimize)).
    pub async fn open_with(
        path: impl AsRef<Path>,
        dimension: usize,
        optimize_after: u64,
    ) -> Result<Self> {
        if dimension == 0 || dimension > 65_536 {
            return Err(Error::Invalid {
                what: "dimension",
                value: dimension.to_string(),
                reason: "must be between 1 and 65536",
            });
        }
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let inner = tokio::task::spawn_blocking(move || Inner::open(p, dimension, optimize_after))
            .await
            .map_err(|e| engine(&path, e))??;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Sets the HNSW beam width of searches (higher: better recall, slower); `None` makes
    /// searches exact (a full scan of the tenant's points).
    pub fn set_search_ef(&self, ef: Option<usize>) {
        self.inner
            .search_ef
            .store(ef.map_or(usize::MAX, |e| e.max(1)), Ordering::Relaxed);
    }

    /// Builds HNSW indexes and merges segments now (blocking writes, not searches, while it
    /// runs); returns whether there was anything to do.
    pub async fn optimize(&self) -> Result<bool> {
        self.blocking(Inner::optimize).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| engine(&self.inner.path, e))?
    }

    fn maybe_optimize(&self) {
        let inner = &self.inner;
        if inner.optimize_after == 0 || inner.changed.load(Ordering::Relaxed) < inner.optimize_after
        {
            return;
        }
        if inner.optimizing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = inner.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.optimize() {
                tracing::warn!(path = %inner.path.display(), error = %e, "vector index build failed");
            }
            inner.optimizing.store(false, Ordering::Release);
        });
    }
}

impl Inner {
    fn open(path: PathBuf, dimension: usize, optimize_after: u64) -> Result<Self> {
        let shard = if path.join("edge_config.json").exists() {
            guarded(&path, || EdgeShard::load(&path, None))?.map_err(|e| {
                let text = e.to_string();
                if text.contains("WouldBlock") {
                    engine(&path, format!("{text} (is it open elsewhere?)"))
                } else {
                    engine(&path, text)
                }
            })?
        } else {
            std::fs::create_dir_all(&path).map_err(|e| engine(&path, e))?;
            let config = EdgeConfig::builder()
                .vector(
                    DEFAULT_VECTOR_NAME,
                    EdgeVectorParams::builder(dimension, Distance::Cosine).build(),
                )
                .build();
            guarded(&path, || EdgeShard::new(&path, config))?.map_err(|e| engine(&path, e))?
        };
        let have = shard
            .config()
            .vectors
            .get(DEFAULT_VECTOR_NAME)
            .map(|v| v.size);
        if have != Some(dimension) {
            return Err(Error::Invalid {
                what: "dimension",
                value: format!("{dimension} (the store at {} has {have:?})", path.display()),
                reason: "differs from the stored memory's",
            });
        }
        let inner = Self {
            shard,
            path,
            dimension,
            write: Mutex::new(()),
            changed: AtomicU64::new(0),
            optimize_after,
            optimizing: AtomicBool::new(false),
            search_ef: AtomicUsize::new(DEFAULT_EF),
        };
        // The tenant index (also after a load: a fresh appendable segment has none).
        let index =
            UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: json_path(&inner.path, TENANT_KEY)?,
                field_schema: Some(PayloadFieldSchema::FieldParams(
                    PayloadSchemaParams::Keyword(KeywordIndexParams {
                        is_tenant: Some(true),
                        ..Default::default()
                    }),
                )),
            }));
        inner.write_durably(vec![index], 0)?;
        Ok(inner)
    }

    /// Applies operations and flushes, under the write lock.
    fn write_durably(&self, ops: Vec<UpdateOperation>, points: u64) -> Result<()> {
        let _held = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        for op in ops {
            guarded(&self.path, || self.shard.update(op))?.map_err(|e| engine(&self.path, e))?;
        }
        guarded(&self.path, || self.shard.flush())?;
        self.changed.fetch_add(points, Ordering::Relaxed);
        Ok(())
    }

    fn optimize(&self) -> Result<bool> {
        let _held = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        self.changed.store(0, Ordering::Relaxed);
        let did =
            guarded(&self.path, || self.shard.optimize())?.map_err(|e| engine(&self.path, e))?;
        guarded(&self.path, || self.shard.flush())?;
        metrics::histogram!("soma_adapters_vector_optimize_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(path = %self.path.display(), did, took_ms = started.elapsed().as_millis() as u64, "vector index build");
        Ok(did)
    }

    fn filter(&self, tenant: &str, filter: Option<&Filter>) -> Result<QFilter> {
        let mut must = vec![QCondition::Field(FieldCondition::new_match(
            json_path(&self.path, TENANT_KEY)?,
            Match::from(tenant.to_owned()),
        ))];
        for c in filter.map(|f| f.must.as_slice()).unwrap_or_default() {
            must.push(QCondition::Field(match c {
                Condition::Equals { key, value } => {
                    let m = match value {
                        MatchValue::Keyword(s) => Match::from(s.clone()),
                        MatchValue::Integer(i) => Match::from(*i),
                        MatchValue::Bool(b) => Match::from(*b),
                    };
                    FieldCondition::new_match(json_path(&self.path, key)?, m)
                }
                Condition::AnyOf { key, values } => FieldCondition::new_match(
                    json_path(&self.path, key)?,
                    Match::from(values.clone()),
                ),
                Condition::Range { key, min, max } => FieldCondition::new_range(
                    json_path(&self.path, key)?,
                    Range {
                        gte: min.map(OrderedFloat),
                        lte: max.map(OrderedFloat),
                        ..Default::default()
                    },
                ),
            }));
        }
        Ok(QFilter {
            must: Some(must),
            ..Default::default()
        })
    }

    fn search_params(&self) -> SearchParams {
        match self.search_ef.load(Ordering::Relaxed) {
            usize::MAX => SearchParams {
                exact: true,
                ..Default::default()
            },
            ef => SearchParams {
                hnsw_ef: Some(ef),
                ..Default::default()
            },
        }
    }

    fn count(&self, filter: QFilter) -> Result<u64> {
        let n = guarded(&self.path, || {
            self.shard.count(CountRequest {
                filter: Some(filter),
                exact: true,
            })
        })?
        .map_err(|e| engine(&self.path, e))?;
        Ok(n as u64)
    }
}

fn dense(v: Option<VectorStructInternal>) -> Vec<f32> {
    match v {
        Some(VectorStructInternal::Single(d)) => d,
        Some(VectorStructInternal::Named(mut named)) => match named.remove(DEFAULT_VECTOR_NAME) {
            Some(qdrant_edge::VectorInternal::Dense(d)) => d,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

#[async_trait]
impl VectorMemory for EdgeVectors {
    fn dimension(&self) -> usize {
        self.inner.dimension
    }

    #[tracing::instrument(level = "debug", skip(self, points), fields(backend = "edge", n = points.len()))]
    async fn upsert(&self, tenant: &str, points: Vec<Point>) -> Result<()> {
        check_id("tenant", tenant)?;
        for p in &points {
            check_point(p, self.inner.dimension)?;
        }
        let n = points.len() as u64;
        let persisted: Vec<PointStructPersisted> = points
            .iter()
            .map(|p| PointStructPersisted {
                id: PointId::Uuid(point_uuid(tenant, &p.id)),
                vector: p.vector.clone().into(),
                payload: Some(qdrant_edge::Payload(stored_payload(tenant, p))),
            })
            .collect();
        let op = UpdateOperation::PointOperation(PointOperations::UpsertPoints(
            PointInsertOperations::PointsList(persisted),
        ));
        self.blocking(move |inner| inner.write_durably(vec![op], n))
            .await?;
        metrics::counter!("soma_adapters_vector_upserted_total", "backend" => "edge").increment(n);
        self.maybe_optimize();
        Ok(())
    }

    async fn search(
        &self,
        tenant: &str,
        vector: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<Hit>> {
        check_id("tenant", tenant)?;
        check_vector(vector, self.inner.dimension)?;
        check_k(k)?;
        if let Some(f) = filter {
            f.check()?;
        }
        let q = self.inner.filter(tenant, filter)?;
        let (tenant, vector) = (tenant.to_owned(), vector.to_vec());
        let started = std::time::Instant::now();
        let hits = self
            .blocking(move |inner| {
                let found = guarded(&inner.path, || {
                    inner.shard.query(QueryRequest {
                        prefetches: vec![],
                        query: Some(ScoringQuery::Vector(QueryEnum::Nearest(
                            NamedQuery::default_dense(vector),
                        ))),
                        filter: Some(q),
                        score_threshold: None,
                        limit: k,
                        offset: 0,
                        params: Some(inner.search_params()),
                        with_vector: WithVector::Bool(false),
                        with_payload: WithPayloadInterface::Bool(true),
                    })
                })?
                .map_err(|e| engine(&inner.path, e))?;
                Ok(found
                    .into_iter()
                    .filter_map(|p| {
                        let (id, payload) = caller_payload(&tenant, p.payload?.0)?;
                        Some(Hit {
                            id,
                            score: p.score,
                            payload,
                        })
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        metrics::histogram!("soma_adapters_vector_search_seconds", "backend" => "edge")
            .record(started.elapsed().as_secs_f64());
        Ok(hits)
    }

    async fn get(&self, tenant: &str, ids: &[String]) -> Result<Vec<Point>> {
        check_id("tenant", tenant)?;
        for id in ids {
            check_id("point id", id)?;
        }
        let tenant = tenant.to_owned();
        let uuids: Vec<PointId> = ids
            .iter()
            .map(|id| PointId::Uuid(point_uuid(&tenant, id)))
            .collect();
        self.blocking(move |inner| {
            let records = guarded(&inner.path, || {
                inner.shard.retrieve(
                    &uuids,
                    Some(WithPayloadInterface::Bool(true)),
                    Some(WithVector::Bool(true)),
                )
            })?
            .map_err(|e| engine(&inner.path, e))?;
            Ok(records
                .into_iter()
                .filter_map(|r| {
                    let (id, payload) = caller_payload(&tenant, r.payload?.0)?;
                    Some(Point {
                        id,
                        vector: dense(r.vector),
                        payload,
                    })
                })
                .collect())
        })
        .await
    }

    async fn delete(&self, tenant: &str, ids: &[String]) -> Result<u64> {
        let existing = self.get(tenant, ids).await?;
        if existing.is_empty() {
            return Ok(0);
        }
        let n = existing.len() as u64;
        let uuids: Vec<PointId> = existing
            .iter()
            .map(|p| PointId::Uuid(point_uuid(tenant, &p.id)))
            .collect();
        let op = UpdateOperation::PointOperation(PointOperations::DeletePoints { ids: uuids });
        self.blocking(move |inner| inner.write_durably(vec![op], n))
            .await?;
        Ok(n)
    }

    async fn count(&self, tenant: &str, filter: Option<&Filter>) -> Result<u64> {
        check_id("tenant", tenant)?;
        if let Some(f) = filter {
            f.check()?;
        }
        let q = self.inner.filter(tenant, filter)?;
        self.blocking(move |inner| inner.count(q)).await
    }

    async fn erase_tenant(&self, tenant: &str) -> Result<u64> {
        check_id("tenant", tenant)?;
        let q = self.inner.filter(tenant, None)?;
        self.blocking(move |inner| {
            let n = inner.count(q.clone())?;
            let op = UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(q));
            inner.write_durably(vec![op], n)?;
            Ok(n)
        })
        .await
    }
}
