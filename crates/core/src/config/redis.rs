//! Redis: where it is (one server, the master Redis Sentinel names, or a Redis Cluster) and
//! how long each call may take.

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
    /// database; its host and port are not used (the sentinels name the master). Several
    /// comma-separated URLs: a Redis Cluster, as REDIS_CLUSTER_URLS.
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
    /// Redis Cluster: comma-separated URLs of some of its nodes (seeds),
    /// redis[s]://[[user]:password@]host:port; Cascade learns the others and the slot map
    /// from them and follows failovers and resharding. Not with REDIS_SENTINEL_URLS.
    #[arg(
        long,
        env = "REDIS_CLUSTER_URLS",
        global = true,
        hide_env_values = true
    )]
    pub redis_cluster_urls: Option<String>,
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
    /// Redis Cluster, when `REDIS_CLUSTER_URLS` (or a `REDIS_URL` of several nodes) is set.
    pub cluster: Option<ClusterNodes>,
}

/// `REDIS_CLUSTER_URLS`: the seed nodes of a Redis Cluster.
#[derive(Debug, Clone)]
pub struct ClusterNodes {
    pub urls: Vec<Secret>,
    /// The URLs, passwords redacted, comma-separated.
    pub display: String,
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
    /// None when none of `REDIS_URL`, `REDIS_SENTINEL_URLS` and `REDIS_CLUSTER_URLS` is set.
    pub(super) fn parse(p: &mut Parser, raw: &RawRedis) -> Option<RedisConfig> {
        let mut url = raw.redis_url.as_deref().filter(|u| !u.trim().is_empty());
        let sentinel = SentinelConfig::parse(p, raw);
        let cluster = ClusterNodes::parse(p, raw);
        if cluster.is_some() {
            if sentinel.is_some() {
                p.fail(
                    "REDIS_CLUSTER_URLS",
                    "cannot be combined with REDIS_SENTINEL_URLS: a Redis Cluster fails over by itself",
                );
                return None;
            }
            // The first node stands for the cluster where one URL is needed (its scheme).
            url = None;
        }
        if url.is_none() && sentinel.is_none() && cluster.is_none() {
            return None;
        }
        let timeout = p.positive_duration("REDIS_TIMEOUT", &raw.redis_timeout, 250 * MILLI);
        // With sentinels and no REDIS_URL, the master takes no password and no TLS.
        let first_node = cluster.as_ref().map(|c| c.urls[0].expose().to_string());
        let url = url.or(first_node.as_deref()).unwrap_or("redis://localhost");
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
            let any_tls =
                |urls: &[Secret]| urls.iter().any(|url| url.expose().starts_with("rediss://"));
            let sentinel_tls = sentinel.as_ref().is_some_and(|s| any_tls(&s.urls))
                || cluster.as_ref().is_some_and(|c| any_tls(&c.urls));
            if !url.starts_with("rediss://") && !sentinel_tls {
                p.fail(
                    "REDIS_CA_CERT",
                    "is for TLS: REDIS_URL (or a REDIS_SENTINEL_URLS entry) must start with rediss://",
                );
            } else if let Err(err) = std::fs::metadata(path) {
                p.fail("REDIS_CA_CERT", format!("{}: {err}", path.display()));
            }
        }
        let display = match (&sentinel, &cluster) {
            (Some(s), _) => format!("master {} via sentinels {}", s.master, s.display),
            (None, Some(c)) => format!("cluster via {}", c.display),
            (None, None) => redact_url(url),
        };
        Some(RedisConfig {
            url: Secret::new(url),
            display,
            timeout,
            ca_cert,
            sentinel,
            cluster,
        })
    }
}

/// Comma-separated `redis[s]://` URLs, each checked; None (after reporting it) if one is not
/// a URL or none is given.
fn url_list<'a>(p: &mut Parser, var: &'static str, list: &'a str) -> Option<Vec<&'a str>> {
    let mut urls = Vec::new();
    for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let tcp = url.starts_with("redis://") || url.starts_with("rediss://");
        if !tcp || redis::Client::open(url).is_err() {
            p.fail(
                var,
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
        p.fail(var, "names no server");
        return None;
    }
    Some(urls)
}

/// The URLs, passwords redacted, comma-separated.
fn display_list(urls: &[&str]) -> String {
    urls.iter()
        .map(|u| redact_url(u))
        .collect::<Vec<_>>()
        .join(",")
}

impl ClusterNodes {
    /// `REDIS_CLUSTER_URLS`, or a `REDIS_URL` naming several nodes.
    fn parse(p: &mut Parser, raw: &RawRedis) -> Option<ClusterNodes> {
        let listed = raw
            .redis_cluster_urls
            .as_deref()
            .filter(|u| !u.trim().is_empty());
        let url = raw.redis_url.as_deref().filter(|u| !u.trim().is_empty());
        let (var, list) = match (listed, url) {
            (Some(_), Some(_)) => {
                p.fail(
                    "REDIS_URL",
                    "is not used with REDIS_CLUSTER_URLS (each node's URL carries its \
                     credentials): unset one of them",
                );
                return None;
            }
            (Some(list), None) => ("REDIS_CLUSTER_URLS", list),
            (None, Some(list)) if list.contains(',') => ("REDIS_URL", list),
            (None, _) => return None,
        };
        let urls = url_list(p, var, list)?;
        Some(ClusterNodes {
            display: display_list(&urls),
            urls: urls.into_iter().map(Secret::new).collect(),
        })
    }
}

impl SentinelConfig {
    fn parse(p: &mut Parser, raw: &RawRedis) -> Option<SentinelConfig> {
        let list = raw
            .redis_sentinel_urls
            .as_deref()
            .filter(|u| !u.trim().is_empty())?;
        let urls = url_list(p, "REDIS_SENTINEL_URLS", list)?;
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
            display: display_list(&urls),
            urls: urls.into_iter().map(Secret::new).collect(),
            master: master.to_string(),
        })
    }
}
