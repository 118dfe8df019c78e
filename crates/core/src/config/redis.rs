//! Redis: where it is and how long each call may take.

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
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    pub display: String,
    pub timeout: Duration,
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
                    "expected redis://[:password@]host[:port][/db], got {:?}",
                    redact_url(url)
                ),
            );
            return None;
        }
        Some(RedisConfig {
            url: Secret::new(url),
            display: redact_url(url),
            timeout,
        })
    }
}
