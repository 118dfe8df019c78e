//! The HTTP server: where it listens, its deadlines, connection cap and body limit, the admin
//! token, and the log format.

use std::time::Duration;

use super::parser::{Parser, SECOND};
use super::values::Secret;

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
    /// Deadline of a request's head (request line and headers), from the connection's opening
    /// or the first byte of a later request on it [default: 10s].
    #[arg(long, env = "HEADER_READ_TIMEOUT", global = true)]
    pub header_read_timeout: Option<String>,
    /// How long a keep-alive connection may wait for its next request [default: 60s].
    #[arg(long, env = "IDLE_TIMEOUT", global = true)]
    pub idle_timeout: Option<String>,
    /// Open connections served at once; more wait in the accept backlog [default: 10000].
    #[arg(long, env = "MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<String>,
    /// Bearer token of the operator endpoints (`GET /health/db`), at least 32 bytes; unset,
    /// they answer 403.
    #[arg(long, env = "ADMIN_TOKEN", global = true, hide_env_values = true)]
    pub admin_token: Option<String>,
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
    /// A request head must arrive within this (slowloris clients trickle one header line at a
    /// time and would otherwise hold their connection forever).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight and no traffic is closed after this.
    pub idle_timeout: Duration,
    /// Connections served at once: each holds a file descriptor and buffers, so an unbounded
    /// number lets any client exhaust them.
    pub max_connections: usize,
    /// None: the operator endpoints are closed (403).
    pub admin_token: Option<Secret>,
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
        let mut http = HttpConfig {
            host,
            port,
            request_timeout: p.positive_duration(
                "REQUEST_TIMEOUT",
                &raw.request_timeout,
                30 * SECOND,
            ),
            body_limit_bytes,
            shutdown_timeout: p.duration("SHUTDOWN_TIMEOUT", &raw.shutdown_timeout, 30 * SECOND),
            header_read_timeout: p.positive_duration(
                "HEADER_READ_TIMEOUT",
                &raw.header_read_timeout,
                10 * SECOND,
            ),
            idle_timeout: p.positive_duration("IDLE_TIMEOUT", &raw.idle_timeout, 60 * SECOND),
            max_connections: p.number(
                "MAX_CONNECTIONS",
                raw.max_connections.as_deref(),
                10_000usize,
                "a number of connections",
            ),
            admin_token: p.secret(&raw.admin_token),
        };
        if http.max_connections == 0 {
            p.fail("MAX_CONNECTIONS", "must be at least 1");
            http.max_connections = 10_000;
        }
        if let Some(token) = &http.admin_token
            && token.expose().len() < 32
        {
            p.fail(
                "ADMIN_TOKEN",
                format!(
                    "must be at least 32 bytes long (got {}); generate one with `openssl rand -hex 32`",
                    token.expose().len()
                ),
            );
        }
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

#[cfg(test)]
mod tests {
    use super::super::{Config, RawConfig};
    use std::time::Duration;

    fn issue_vars(f: impl FnOnce(&mut RawConfig)) -> Vec<&'static str> {
        let mut raw = RawConfig::default();
        f(&mut raw);
        Config::from_raw(&raw)
            .err()
            .map(|e| e.0.iter().map(|i| i.var).collect())
            .unwrap_or_default()
    }

    #[test]
    fn connection_deadlines_and_cap_have_defaults_and_refuse_zero() {
        let http = Config::from_raw(&RawConfig::default()).unwrap().http;
        assert_eq!(http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(http.idle_timeout, Duration::from_secs(60));
        assert_eq!(http.max_connections, 10_000);
        assert!(http.admin_token.is_none());
        assert_eq!(
            issue_vars(|r| {
                r.http.header_read_timeout = Some("0".into());
                r.http.idle_timeout = Some("soon".into());
                r.http.max_connections = Some("0".into());
            }),
            vec!["HEADER_READ_TIMEOUT", "IDLE_TIMEOUT", "MAX_CONNECTIONS"]
        );
    }

    #[test]
    fn an_admin_token_is_at_least_32_bytes_and_never_shown() {
        assert_eq!(
            issue_vars(|r| r.http.admin_token = Some("short".into())),
            vec!["ADMIN_TOKEN"]
        );
        let token = "an-admin-token-of-at-least-32-bytes";
        let mut raw = RawConfig::default();
        raw.http.admin_token = Some(token.into());
        let config = Config::from_raw(&raw).unwrap();
        assert_eq!(
            config.http.admin_token.as_ref().map(|t| t.expose()),
            Some(token)
        );
        assert!(!format!("{:?}", config.describe()).contains(token));
        assert!(!format!("{config:?}").contains(token));
    }
}
