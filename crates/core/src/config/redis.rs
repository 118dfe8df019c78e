//! Redis: where it is (one server, or the master Redis Sentinel names) and how long each call
//! may take.

use std::path::PathBuf;
use std::time::Duration;

use super::parser::Parser;
use super::values::{Secret, redact_url};

const MILLI: Duration = Duration::from_millis(1);

/// `REDIS_URL` and the deadline of every call.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawRedis {
    /// Redis URL. Unset: no Redis, the cache tier is in-process only. With
    /// REDIS_SENTINEL_URLS: the master's scheme (rediss:// for TLS), user, password and
    /// database; its host and port are not used (the sentinels name the master).
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Deadline of every Redis call [default: 250ms].
    #[arg(long, env = "REDIS_TIMEOUT", global = true)]
    pub redis_timeout: Option<String>,
    /// PEM file of the CA that signed a rediss:// server's certificate, when it is not one
    /// the system trusts [default: the system's roots]. Also used for rediss:// sentinels.
    #[arg(long, env = "REDIS_CA_CERT", global = true)]
    pub redis_ca_cert: Option<PathBuf>,
    /// Redis Sentinel: comma-separated sentinel URLs, redis[s]://[[user]:password@]host:port.
    /// Cascade asks them where the master is and follows it after a failover.
    #[arg(
        long,
        env = "REDIS_SENTINEL_URLS",
        global = true,
        hide_env_values = true
    )]
    pub redis_sentinel_urls: Option<String>,
    /// The master's name in the sentinels' `sentinel monitor` line [default: mymaster].
    #[arg(long, env = "REDIS_SENTINEL_MASTER", global = true)]
    pub redis_sentinel_master: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `REDIS_URL`. With [`sentinel`](Self::sentinel), the template of the master's
    /// connections (scheme, credentials, database), whose host is replaced by the master's.
    pub url: Secret,
    pub display: String,
    pub timeout: Duration,
    /// `REDIS_CA_CERT`: the roots a `rediss://` server is checked against instead of the
    /// system's.
    pub ca_cert: Option<PathBuf>,
    /// Redis Sentinel, when `REDIS_SENTINEL_URLS` is set.
    pub sentinel: Option<SentinelConfig>,
}

/// `REDIS_SENTINEL_URLS` and `REDIS_SENTINEL_MASTER`.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    pub urls: Vec<Secret>,
    /// The URLs, passwords redacted, comma-separated.
    pub display: String,
    pub master: String,
}

const URL_SHAPE: &str = "redis[s]://[[user]:password@]host[:port][/db]";

impl RedisConfig {
    /// None when neither `REDIS_URL` nor `REDIS_SENTINEL_URLS` is set.
    pub(super) fn parse(p: &mut Parser, raw: &RawRedis) -> Option<RedisConfig> {
        let url = raw.redis_url.as_deref().filter(|u| !u.trim().is_empty());
        let sentinel = SentinelConfig::parse(p, raw);
        if url.is_none() && sentinel.is_none() {
            return None;
        }
        let timeout = p.positive_duration("REDIS_TIMEOUT", &raw.redis_timeout, 250 * MILLI);
        // With sentinels and no REDIS_URL, the master takes no password and no TLS.
        let url = url.unwrap_or("redis://localhost");
        let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|s| url.starts_with(s));
        if !scheme_ok || redis::Client::open(url).is_err() {
            p.fail(
                "REDIS_URL",
                format!("expected {URL_SHAPE}, got {:?}", redact_url(url)),
            );
            return None;
        }
        let ca_cert = raw.redis_ca_cert.clone();
        if let Some(path) = &ca_cert {
            let sentinel_tls = sentinel.as_ref().is_some_and(|s| {
                s.urls
                    .iter()
                    .any(|url| url.expose().starts_with("rediss://"))
            });
            if !url.starts_with("rediss://") && !sentinel_tls {
                p.fail(
                    "REDIS_CA_CERT",
                    "is for TLS: REDIS_URL (or a REDIS_SENTINEL_URLS entry) must start with rediss://",
                );
            } else if let Err(err) = std::fs::metadata(path) {
                p.fail("REDIS_CA_CERT", format!("{}: {err}", path.display()));
            }
        }
        let display = match &sentinel {
            Some(s) => format!("master {} via sentinels {}", s.master, s.display),
            None => redact_url(url),
        };
        Some(RedisConfig {
            url: Secret::new(url),
            display,
            timeout,
            ca_cert,
            sentinel,
        })
    }
}

impl SentinelConfig {
    fn parse(p: &mut Parser, raw: &RawRedis) -> Option<SentinelConfig> {
        let list = raw
            .redis_sentinel_urls
            .as_deref()
            .filter(|u| !u.trim().is_empty())?;
        let mut urls = Vec::new();
        for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let tcp = url.starts_with("redis://") || url.starts_with("rediss://");
            if !tcp || redis::Client::open(url).is_err() {
                p.fail(
                    "REDIS_SENTINEL_URLS",
                    format!(
                        "expected {URL_SHAPE}, comma-separated, got {:?}",
                        redact_url(url)
                    ),
                );
                return None;
            }
            urls.push(url);
        }
        if urls.is_empty() {
            p.fail("REDIS_SENTINEL_URLS", "names no sentinel");
            return None;
        }
        let master = raw
            .redis_sentinel_master
            .as_deref()
            .map(str::trim)
            .unwrap_or("mymaster");
        if master.is_empty() || master.contains(char::is_whitespace) {
            p.fail(
                "REDIS_SENTINEL_MASTER",
                format!("expected the name of a `sentinel monitor` line, got {master:?}"),
            );
        }
        Some(SentinelConfig {
            display: urls
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(","),
            urls: urls.into_iter().map(Secret::new).collect(),
            master: master.to_string(),
        })
    }
}
