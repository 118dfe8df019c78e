//! The HTTP server: where it listens, its deadlines and body limit, and the log format.

use std::time::Duration;

use super::parser::{Parser, SECOND};

/// Where the server listens and its limits.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawHttp {
    /// Address the HTTP server listens on [default: 127.0.0.1].
    #[arg(long, env = "HOST", global = true)]
    pub host: Option<String>,
    /// Port the HTTP server listens on [default: 8000].
    #[arg(long, env = "PORT", global = true)]
    pub port: Option<String>,
    /// Deadline of one HTTP request [default: 30s].
    #[arg(long, env = "REQUEST_TIMEOUT", global = true)]
    pub request_timeout: Option<String>,
    /// Largest accepted request body in bytes [default: 1048576].
    #[arg(long, env = "BODY_LIMIT_BYTES", global = true)]
    pub body_limit_bytes: Option<String>,
    /// How long shutdown waits for in-flight requests [default: 30s].
    #[arg(long, env = "SHUTDOWN_TIMEOUT", global = true)]
    pub shutdown_timeout: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub host: String,
    pub port: u16,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl HttpConfig {
    pub(super) fn parse(p: &mut Parser, raw: &RawHttp) -> (HttpConfig, LogFormat) {
        let port = p.number(
            "PORT",
            raw.port.as_deref(),
            8000u16,
            "a TCP port number from 0 to 65535",
        );
        let host = raw.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        if host.trim().is_empty() {
            p.fail("HOST", "must not be empty");
        }
        let body_limit_bytes = p.number(
            "BODY_LIMIT_BYTES",
            raw.body_limit_bytes.as_deref(),
            1024 * 1024usize,
            "a size in bytes",
        );
        let http = HttpConfig {
            host,
            port,
            request_timeout: p.positive_duration(
                "REQUEST_TIMEOUT",
                &raw.request_timeout,
                30 * SECOND,
            ),
            body_limit_bytes,
            shutdown_timeout: p.duration("SHUTDOWN_TIMEOUT", &raw.shutdown_timeout, 30 * SECOND),
        };
        let log_format = match raw
            .log_format
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.fail(
                    "LOG_FORMAT",
                    format!("expected text or json, got {other:?}"),
                );
                LogFormat::Text
            }
        };
        (http, log_format)
    }
}
