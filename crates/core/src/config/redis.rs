//! Redis: where it is and how long each call may take.

use std::path::PathBuf;
use std::time::Duration;

use super::parser::Parser;
use super::values::{Secret, redact_url};

const MILLI: Duration = Duration::from_millis(1);

/// `REDIS_URL` and the deadline of every call.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawRedis {
    /// Redis URL. Unset: no Redis, the cache tier is in-process only.
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Deadline of every Redis call [default: 250ms].
    #[arg(long, env = "REDIS_TIMEOUT", global = true)]
    pub redis_timeout: Option<String>,
    /// PEM file of the CA that signed a rediss:// server's certificate, when it is not one
    /// the system trusts [default: the system's roots].
    #[arg(long, env = "REDIS_CA_CERT", global = true)]
    pub redis_ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    pub display: String,
    pub timeout: Duration,
    /// `REDIS_CA_CERT`: the roots a `rediss://` server is checked against instead of the
    /// system's.
    pub ca_cert: Option<PathBuf>,
}

impl RedisConfig {
    /// None when no `REDIS_URL` is set.
    pub(super) fn parse(p: &mut Parser, raw: &RawRedis) -> Option<RedisConfig> {
        let url = raw.redis_url.as_deref().filter(|u| !u.trim().is_empty())?;
        let timeout = p.positive_duration("REDIS_TIMEOUT", &raw.redis_timeout, 250 * MILLI);
        let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|s| url.starts_with(s));
        if !scheme_ok || redis::Client::open(url).is_err() {
            p.fail(
                "REDIS_URL",
                format!(
                    "expected redis[s]://[[user]:password@]host[:port][/db], got {:?}",
                    redact_url(url)
                ),
            );
            return None;
        }
        let ca_cert = raw.redis_ca_cert.clone();
        if let Some(path) = &ca_cert {
            if !url.starts_with("rediss://") {
                p.fail(
                    "REDIS_CA_CERT",
                    "is for TLS: REDIS_URL must start with rediss://",
                );
            } else if let Err(err) = std::fs::metadata(path) {
                p.fail("REDIS_CA_CERT", format!("{}: {err}", path.display()));
            }
        }
        Some(RedisConfig {
            url: Secret::new(url),
            display: redact_url(url),
            timeout,
            ca_cert,
        })
    }
}
