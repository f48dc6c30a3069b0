//! The router, its middleware (API keys, rate limits, timeouts, panics) and the supervised
//! gateway actor that owns the listener.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Map, Value, json};
use soma_supervision::{ChildSpec, Policy, Restart, Supervisor, SupervisorMsg};
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;

use crate::config::GatewayConfig;
use crate::error::{ApiError, Error, Result, Shape};
use crate::keys::{KeyStore, Refusal};
use crate::models::{Models, Served};

/// Whether the node is ready to serve (models loaded, journal open): `Err` says what is not.
pub type Readiness = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) models: Models,
    keys: Arc<KeyStore>,
    limiter: DefaultKeyedRateLimiter<String>,
    ready: Readiness,
    metrics: Option<PrometheusHandle>,
    timeout: Duration,
    /// Becomes true when the gateway shuts down: streams end with a final event.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Constitutions and metering, when the node runs tenants.
    pub(crate) governed: Option<Arc<crate::governed::Governed>>,
}

/// What the gateway serves and consults.
pub struct Services {
    /// The models.
    pub models: Models,
    /// The API keys.
    pub keys: Arc<KeyStore>,
    /// Whether the node is ready.
    pub ready: Readiness,
    /// The metrics exported at `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Constitutions and metering of model calls.
    pub governed: Option<crate::governed::Governed>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

/// Parses a request body as a JSON object.
pub(crate) fn parse_object(body: &Bytes) -> std::result::Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// The required string field `model` of a request.
pub(crate) fn model_field(o: &Map<String, Value>) -> std::result::Result<String, ApiError> {
    match o.get("model") {
        Some(Value::String(m)) => Ok(m.clone()),
        Some(_) => Err(ApiError::invalid(
            "invalid_type",
            "model",
            "model must be a string",
        )),
        None => Err(ApiError::invalid(
            "missing_parameter",
            "model",
            "model is required",
        )),
    }
}

/// The served model `id`, or OpenAI's 404.
pub(crate) fn find_model<'a>(
    state: &'a AppState,
    id: &str,
) -> std::result::Result<&'a Served, ApiError> {
    state.models.get(id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("The model `{id}` does not exist"),
        )
        .with_param("model")
    })
}

/// A body that could not be read: too large (413) or broken.
pub(crate) fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "body_too_large",
            "the request body is larger than the gateway accepts",
        )
    } else {
        ApiError::new(status, "invalid_body", rejection.body_text())
    }
}

fn shape_of(path: &str) -> Shape {
    if path.starts_with("/v1/") {
        Shape::OpenAi
    } else {
        Shape::Problem
    }
}

/// API key check and per-key rate limit, for `/v1/*`.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        )
        .into_response();
    };
    let principal = match state.keys.verify(token) {
        Ok(Ok(p)) => p,
        Ok(Err(refusal)) => {
            let (code, what) = match refusal {
                Refusal::Unknown => ("invalid_api_key", "Incorrect API key provided."),
                Refusal::Revoked => ("revoked_api_key", "This API key was revoked."),
                Refusal::Expired => ("expired_api_key", "This API key has expired."),
            };
            metrics::counter!("soma_gateway_auth_failures_total", "code" => code).increment(1);
            return ApiError::new(StatusCode::UNAUTHORIZED, code, what).into_response();
        }
        Err(e) => {
            tracing::error!(error = %e, "api key store unreadable");
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "key_store_unavailable",
                "the API key store cannot be read",
            )
            .into_response();
        }
    };
    if let Err(not_until) = state.limiter.check_key(&principal.key_id) {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        metrics::counter!("soma_gateway_rate_limited_total", "tenant" => principal.tenant.clone())
            .increment(1);
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!(
                "Rate limit reached for this API key; retry in {} ms.",
                wait.as_millis()
            ),
        )
        .retry_after(wait.as_secs_f64().ceil().max(1.0) as u64)
        .into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Request timeout (until the response starts) and request metrics, for every route.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let shape = shape_of(req.uri().path());
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let response = match tokio::time::timeout(state.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {} s", state.timeout.as_secs()),
        )
        .with_shape(shape)
        .into_response(),
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("soma_gateway_requests_total", "route" => path.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("soma_gateway_request_seconds", "route" => path)
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(%method, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    response
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.models.is_empty() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no model is loaded",
        )
        .problem()
        .into_response();
    }
    match (state.ready)() {
        Ok(()) => Json(json!({"status": "ready", "models": state.models.len()})).into_response(),
        Err(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why)
            .problem()
            .into_response(),
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "metrics_not_installed",
            "this gateway was started without a metrics recorder",
        )
        .problem()
        .into_response(),
    }
}

fn model_object(id: &str, served: &Served, created: u64) -> Value {
    let kind = match served {
        Served::Generator(_) => "chat",
        Served::Embedder(_) => "embedding",
    };
    json!({"id": id, "object": "model", "created": created, "owned_by": "soma", "kind": kind})
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|(id, s)| model_object(id, s, state.models.created))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> std::result::Result<Json<Value>, ApiError> {
    let served = find_model(&state, &id)?;
    Ok(Json(model_object(&id, served, state.models.created)))
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route {path}"),
    )
    .with_shape(shape_of(&path))
    .into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    tracing::error!("a request handler panicked");
    metrics::counter!("soma_gateway_panics_total").increment(1);
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the request failed inside the gateway",
    )
    .problem()
    .into_response()
}

fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(crate::chat::completions))
        .route("/v1/embeddings", post(crate::embeddings::embeddings))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .merge(v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// Shared by the gateway handle and every incarnation of its actor.
struct Shared {
    app: Router,
    listen: String,
    /// The address bound first; a restarted listener binds it again.
    bound: Mutex<Option<SocketAddr>>,
    stop: watch::Sender<bool>,
    /// True once a listener has ended after `stop`.
    drained: watch::Sender<bool>,
    /// The running server task, cut when the shutdown grace runs out.
    serving: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The actor that owns the listener: it binds at start, and fails (to be restarted by its
/// supervisor) if the server task ends by itself.
struct GatewayActor {
    shared: Arc<Shared>,
}

enum GatewayMsg {
    ListenerEnded(String),
}

struct ActorState {
    task: tokio::task::JoinHandle<()>,
}

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = ActorState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<GatewayMsg>,
        _: (),
    ) -> std::result::Result<ActorState, ActorProcessingErr> {
        let shared = self.shared.clone();
        let addr = shared
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or_else(|| shared.listen.clone(), |a| a.to_string());
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::Bind {
                addr: addr.clone(),
                source: e,
            })?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Bind { addr, source: e })?;
        *shared.bound.lock().unwrap_or_else(|p| p.into_inner()) = Some(local);
        tracing::info!(addr = %local, "gateway listening");
        let app = shared.app.clone();
        let mut stop = shared.stop.subscribe();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            let why = match served {
                Ok(()) => "the server returned".to_string(),
                Err(e) => e.to_string(),
            };
            if *shared.stop.borrow() {
                shared.drained.send_replace(true);
            }
            let _ = myself.send_message(GatewayMsg::ListenerEnded(why));
        });
        *self
            .shared
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        Ok(ActorState { task })
    }

    async fn handle(
        &self,
        myself: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        _: &mut ActorState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::ListenerEnded(why) => {
                if *self.shared.stop.borrow() {
                    myself.stop(None);
                    Ok(())
                } else {
                    tracing::error!(reason = %why, "gateway listener ended; restarting it");
                    Err(format!("listener ended: {why}").into())
                }
            }
        }
    }

    async fn post_stop(
        &self,
        _: ActorRef<GatewayMsg>,
        state: &mut ActorState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        if !*self.shared.stop.borrow() {
            state.task.abort();
        }
        Ok(())
    }
}

/// A running gateway.
pub struct Gateway {
    supervisor: ActorRef<SupervisorMsg>,
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the gateway actor under its supervisor and binds `config.listen`.
    pub async fn start(config: GatewayConfig, services: Services) -> Result<Self> {
        let Services {
            models,
            keys,
            ready,
            metrics,
            governed,
        } = services;
        config.validate()?;
        let quota = Quota::per_minute(
            std::num::NonZeroU32::new(config.rate_limit_per_minute)
                .unwrap_or(std::num::NonZeroU32::MIN),
        )
        .allow_burst(
            std::num::NonZeroU32::new(config.rate_limit_burst).unwrap_or(std::num::NonZeroU32::MIN),
        );
        let (stop, stopping) = watch::channel(false);
        let state = Arc::new(AppState {
            models,
            keys,
            limiter: RateLimiter::keyed(quota),
            ready,
            metrics,
            timeout: Duration::from_secs(config.request_timeout_secs),
            stopping,
            governed: governed.map(Arc::new),
        });
        let shared = Arc::new(Shared {
            app: router(state, config.body_limit_bytes),
            listen: config.listen.clone(),
            bound: Mutex::new(None),
            stop,
            drained: watch::channel(false).0,
            serving: Mutex::new(None),
        });
        let child_shared = shared.clone();
        let spec = ChildSpec::new("gateway", Restart::Transient, move || {
            (
                GatewayActor {
                    shared: child_shared.clone(),
                },
                (),
            )
        });
        let supervisor = Supervisor::start("gateway", Policy::default(), vec![spec], None)
            .await
            .map_err(|e| Error::Actor(e.to_string()))?;
        let addr = shared
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| Error::Actor("the gateway did not bind".into()))?;
        Ok(Self {
            supervisor,
            shared,
            addr,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends every stream with a final event, waits up to `grace` for
    /// requests in flight, then stops the actor and its supervisor.
    pub async fn shutdown(self, grace: Duration) -> Result<()> {
        let _ = self.shared.stop.send(true);
        let mut drained = self.shared.drained.subscribe();
        if tokio::time::timeout(grace, drained.wait_for(|d| *d))
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "requests still in flight when the shutdown grace ran out; they end with the process"
            );
        }
        self.supervisor
            .stop_and_wait(None, Some(grace))
            .await
            .map_err(|e| Error::Actor(e.to_string()))
    }
}
