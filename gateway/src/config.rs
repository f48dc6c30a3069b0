//! The gateway's options.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the gateway listens and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest request body accepted, in bytes (larger: 413).
    pub body_limit_bytes: usize,
    /// Longest a request may take until its response starts, in seconds (then 504). A
    /// streamed answer is not cut once it has started.
    pub request_timeout_secs: u64,
    /// Requests per minute allowed per API key (then 429 with `Retry-After`).
    pub rate_limit_per_minute: u32,
    /// Requests a key may make at once above the steady rate.
    pub rate_limit_burst: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            body_limit_bytes: 2 * 1024 * 1024,
            request_timeout_secs: 300,
            rate_limit_per_minute: 600,
            rate_limit_burst: 60,
        }
    }
}

impl GatewayConfig {
    /// Checks every value; the error names the key (under `gateway.`).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| Error::Config {
            key: format!("gateway.{key}"),
            reason: reason.into(),
        };
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "listen",
                &format!("{:?} is not an address like 127.0.0.1:8080", self.listen),
            ));
        }
        if self.body_limit_bytes < 1024 {
            return Err(bad("body_limit_bytes", "must be at least 1024"));
        }
        if self.request_timeout_secs == 0 {
            return Err(bad("request_timeout_secs", "must be at least 1"));
        }
        if self.rate_limit_per_minute == 0 {
            return Err(bad("rate_limit_per_minute", "must be at least 1"));
        }
        if self.rate_limit_burst == 0 {
            return Err(bad("rate_limit_burst", "must be at least 1"));
        }
        Ok(())
    }
}
