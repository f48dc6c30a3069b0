//! `http.request`: an HTTP request to a host on the tenant's allow-list
//! (`TenantSettings::allowed_hosts`), with no redirect to another host and limits on time and
//! size.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Invocation, Tool, ToolError, ToolErrorKind, str_arg};
use crate::tenant::Tenants;

/// Limits of `http.request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Bytes of a response body, at most.
    pub max_response_bytes: usize,
    /// Bytes of a request body, at most.
    pub max_request_bytes: usize,
    /// How long a request may take, redirects included.
    pub timeout: Duration,
    /// Redirects followed (to the same host), at most.
    pub max_redirects: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_response_bytes: 1024 * 1024,
            max_request_bytes: 256 * 1024,
            timeout: Duration::from_secs(10),
            max_redirects: 5,
        }
    }
}

/// The `http.request` tool.
#[derive(Debug, Clone)]
pub struct HttpRequestTool {
    tenants: Tenants,
    client: reqwest::Client,
    limits: HttpLimits,
}

impl HttpRequestTool {
    /// The tool, checking hosts against each tenant's allow-list in `tenants`.
    pub fn new(tenants: Tenants, limits: HttpLimits) -> crate::Result<Self> {
        let max = limits.max_redirects;
        let client = reqwest::Client::builder()
            .timeout(limits.timeout)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let first = attempt.previous().first().map(host_port);
                if attempt.previous().len() > max {
                    attempt.error(format!("more than {max} redirects"))
                } else if first.as_ref() != Some(&host_port(attempt.url())) {
                    let to = attempt.url().host_str().unwrap_or("?").to_string();
                    attempt.error(format!("a redirect to another host ({to}) is not followed"))
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| crate::Error::Config(format!("http client: {e}")))?;
        Ok(Self {
            tenants,
            client,
            limits,
        })
    }
}

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(&format!(": {s}"));
        next = s.source();
    }
    out
}

fn host_port(url: &reqwest::Url) -> (String, Option<u16>) {
    (
        url.host_str().unwrap_or_default().to_ascii_lowercase(),
        url.port_or_known_default(),
    )
}

/// Whether `host` on `port` is allowed by `allowed`: exact names, or `*.example.com` for
/// subdomains; an entry without a port allows only the scheme's default port
/// (`default_port`), `name:port` that port.
pub(crate) fn host_allowed(allowed: &[String], host: &str, port: u16, default_port: u16) -> bool {
    let host = host.to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        let (name, p) = match a.rsplit_once(':') {
            Some((n, p)) if !n.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                (n.to_string(), p.parse::<u16>().ok())
            }
            _ => (a.clone(), None),
        };
        let port_ok = match p {
            Some(p) => p == port,
            None => port == default_port,
        };
        let name_ok = match name.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => name == host,
        };
        port_ok && name_ok
    })
}

#[async_trait]
impl Tool for HttpRequestTool {
    fn name(&self) -> &str {
        "http.request"
    }

    fn description(&self) -> &str {
        "Sends an HTTP request to an allowed host and returns the status and body."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "method": {"enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]},
                "url": {"type": "string"},
                "body": {"type": "string"},
            },
            "required": ["method", "url"],
            "additionalProperties": false,
        })
    }

    fn timeout(&self) -> Duration {
        self.limits.timeout + Duration::from_secs(1)
    }

    async fn run(&self, call: &Invocation) -> Result<Value, ToolError> {
        let url = str_arg(&call.arguments, "url")?;
        let url = reqwest::Url::parse(url)
            .map_err(|e| ToolError::invalid(format!("url {url:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolError::invalid(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        let host = url.host_str().unwrap_or_default();
        let tenant = self
            .tenants
            .get(&call.tenant)
            .await
            .map_err(|e| ToolError::retryable(format!("tenant lookup failed: {e}")))?;
        let default_port = if url.scheme() == "https" { 443 } else { 80 };
        let port = url.port_or_known_default().unwrap_or(default_port);
        if !host_allowed(&tenant.settings.allowed_hosts, host, port, default_port) {
            return Err(ToolError::new(
                ToolErrorKind::Denied,
                format!("host {host:?} port {port} is not on the tenant's allow-list"),
            ));
        }
        let method = match str_arg(&call.arguments, "method")? {
            "GET" => reqwest::Method::GET,
            "POST" => reqwest::Method::POST,
            "PUT" => reqwest::Method::PUT,
            "PATCH" => reqwest::Method::PATCH,
            "DELETE" => reqwest::Method::DELETE,
            "HEAD" => reqwest::Method::HEAD,
            other => {
                return Err(ToolError::invalid(format!(
                    "method {other:?} is not allowed"
                )));
            }
        };
        let mut req = self
            .client
            .request(method, url)
            .header("idempotency-key", &call.idempotency_key);
        if let Some(body) = call.arguments.get("body").and_then(Value::as_str) {
            if body.len() > self.limits.max_request_bytes {
                return Err(ToolError::invalid(format!(
                    "the body has {} bytes, more than the limit of {}",
                    body.len(),
                    self.limits.max_request_bytes
                )));
            }
            req = req.body(body.to_string());
        }
        let mut resp = req.send().await.map_err(|e| {
            // The URL may carry secrets (a query token): errors name no URL.
            let e = e.without_url();
            if e.is_redirect() {
                ToolError::failed(format!("request refused: {}", chain(&e)))
            } else {
                ToolError::retryable(format!("request failed: {}", chain(&e)))
            }
        })?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            ToolError::retryable(format!("reading the response failed: {}", e.without_url()))
        })? {
            if body.len() + chunk.len() > self.limits.max_response_bytes {
                return Err(ToolError::failed(format!(
                    "the response is larger than the limit of {} bytes",
                    self.limits.max_response_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if matches!(status, 429 | 502 | 503 | 504) {
            return Err(ToolError::retryable(format!(
                "the server answered {status}"
            )));
        }
        Ok(json!({
            "status": status,
            "content_type": content_type,
            "body": String::from_utf8_lossy(&body),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts_match_exactly_or_by_wildcard_subdomain_on_allowed_ports() {
        let allowed = vec![
            "api.example.com".to_string(),
            "*.internal.org".to_string(),
            "127.0.0.1:8080".to_string(),
        ];
        let ok = |h: &str, p: u16| host_allowed(&allowed, h, p, 443);
        assert!(ok("api.example.com", 443));
        assert!(ok("API.Example.com", 443));
        assert!(!ok("api.example.com", 6379));
        assert!(!ok("example.com", 443));
        assert!(!ok("api.example.com.evil.net", 443));
        assert!(ok("a.internal.org", 443));
        assert!(!ok("internal.org", 443));
        assert!(!ok("xinternal.org", 443));
        assert!(ok("127.0.0.1", 8080));
        assert!(!ok("127.0.0.1", 443));
        assert!(!host_allowed(&[], "api.example.com", 443, 443));
    }
}
