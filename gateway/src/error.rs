//! The crate's error, and the two shapes errors take on the wire: OpenAI's
//! `{"error": {...}}` on `/v1/*` (its clients parse it) and `application/problem+json`
//! with a stable `code` everywhere else.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// What the gateway's setup and key store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid.
    #[error("configuration {key}: {reason}")]
    Config {
        /// The offending key, as written in the configuration file.
        key: String,
        /// Why it is refused.
        reason: String,
    },
    /// A file of the gateway (the key store) could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key store's file is not what the gateway writes.
    #[error("key store {path}: {detail}")]
    KeyStore {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No API key has this id.
    #[error("no API key with id {0}")]
    NoSuchKey(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The gateway actor could not be started or stopped.
    #[error("gateway actor: {0}")]
    Actor(String),
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Which wire shape an error takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// OpenAI's error object (`/v1/*`).
    OpenAi,
    /// RFC 9457 problem details.
    Problem,
}

/// An error answered to an HTTP request.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    /// Stable machine-readable code (`invalid_request`, `unknown_field`, `rate_limited`, ...).
    pub(crate) code: &'static str,
    /// OpenAI's error `type` (`invalid_request_error`, `authentication_error`, ...).
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    /// The request field at fault, if one is.
    pub(crate) param: Option<String>,
    pub(crate) retry_after_secs: Option<u64>,
    pub(crate) shape: Shape,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        Self {
            status,
            code,
            kind,
            message: message.into(),
            param: None,
            retry_after_secs: None,
            shape: Shape::OpenAi,
        }
    }

    /// A 400 naming the field at fault.
    pub(crate) fn invalid(
        code: &'static str,
        param: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, code, message);
        e.param = Some(param.into());
        e
    }

    pub(crate) fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub(crate) fn problem(mut self) -> Self {
        self.shape = Shape::Problem;
        self
    }

    pub(crate) fn with_shape(mut self, shape: Shape) -> Self {
        self.shape = shape;
        self
    }

    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl From<soma_inference::Error> for ApiError {
    fn from(e: soma_inference::Error) -> Self {
        use soma_inference::Error as I;
        match &e {
            I::InvalidRequest(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            I::Schema { .. } => {
                ApiError::invalid("unsupported_schema", "response_format", e.to_string())
            }
            I::IncompleteStructured(_) => {
                ApiError::invalid("structured_output_incomplete", "max_tokens", e.to_string())
            }
            I::QueueFull(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
                    .retry_after(1)
            }
            I::Unavailable(_) | I::ReplicaFailed { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                e.to_string(),
            ),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "inference_failed",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("soma_gateway_errors_total", "code" => self.code).increment(1);
        let (body, content_type) = match self.shape {
            Shape::OpenAi => (
                serde_json::json!({
                    "error": {
                        "message": self.message,
                        "type": self.kind,
                        "param": self.param,
                        "code": self.code,
                    }
                }),
                "application/json",
            ),
            Shape::Problem => {
                let mut body = serde_json::json!({
                    "type": format!("https://somaagent.dev/problems/{}", self.code),
                    "title": self.status.canonical_reason().unwrap_or("error"),
                    "status": self.status.as_u16(),
                    "code": self.code,
                    "detail": self.message,
                });
                if let (Some(p), Some(o)) = (&self.param, body.as_object_mut()) {
                    o.insert("param".into(), p.clone().into());
                }
                (body, "application/problem+json")
            }
        };
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(secs) = self.retry_after_secs
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        response
    }
}
