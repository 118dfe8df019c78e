//! `cascade check`'s production review: settings that work on a laptop and hurt in production.
//! Each finding is `ok` or `warn`; warnings never fail the check (the server runs with them),
//! they say what will go wrong and what to set instead. The figures are seed 002's
//! ("PostgreSQL Optimizations") and the cache's needs of Redis.

use std::collections::HashMap;
use std::net::IpAddr;

use cascade_core::config::{DatabaseConfig, DatabaseSource, RedisConfig, redact_url};
use cascade_core::db::tls::SslMode;
use cascade_core::redis::Redis;
use redis::IntoConnectionInfo;
use tokio_postgres::config::Host;

pub struct Finding {
    pub ok: bool,
    pub name: &'static str,
    pub detail: String,
}

pub fn ok(name: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        name,
        detail: detail.into(),
    }
}

pub fn warn(name: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        name,
        detail: detail.into(),
    }
}

const MB: u64 = 1 << 20;

/// Connections an instance may hold beyond its pool: the bus's and the domain events'
/// listeners (unified mode) and the queue's wake-up listener.
const LISTENERS_PER_INSTANCE: u64 = 3;

/// Whether `host` is this machine: traffic to it never crosses a network.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Connections to another machine that are plain text, or encrypted to a server not verified.
pub fn tls(database: &DatabaseConfig, redis: Option<&RedisConfig>) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let DatabaseSource::External {
        config,
        address,
        tls,
        ..
    } = &database.source
    {
        let remote: Vec<&str> = config
            .get_hosts()
            .iter()
            .filter_map(|host| match host {
                Host::Tcp(name) if !is_loopback(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let mode = tls.mode.as_str();
        findings.push(if remote.is_empty() {
            ok(
                "pg tls",
                format!("{address} is this machine: no network to cross (sslmode={mode})"),
            )
        } else if tls.verifies_host() {
            ok(
                "pg tls",
                "sslmode=verify-full: encrypted, and the server's name is checked",
            )
        } else if matches!(tls.mode, SslMode::Disable | SslMode::Prefer) {
            warn(
                "pg tls",
                format!(
                    "{address} is another machine and sslmode={mode} allows plain text: the \
                     password and every row may cross the network readable; set \
                     sslmode=verify-full (with sslrootcert=<CA file> for a private CA)"
                ),
            )
        } else {
            warn(
                "pg tls",
                format!(
                    "{address} is another machine and sslmode={mode} encrypts without checking \
                     whose certificate it is: a machine in the middle can pose as the server; \
                     set sslmode=verify-full"
                ),
            )
        });
    }
    if let Some(redis) = redis {
        let judge = |display: &str, url: &str| {
            let addr = url.into_connection_info().map(|info| info.addr().clone());
            match addr {
                Ok(redis::ConnectionAddr::Tcp(host, _)) if !is_loopback(&host) => warn(
                    "redis tls",
                    format!(
                        "{display} is another machine over redis:// (plain text): AUTH \
                         passwords and cached data cross the network readable; use rediss:// \
                         or a private network"
                    ),
                ),
                Ok(redis::ConnectionAddr::TcpTls { insecure: true, .. }) => warn(
                    "redis tls",
                    "rediss://…#insecure encrypts without checking whose certificate it is: a \
                     machine in the middle can pose as Redis; drop #insecure (REDIS_CA_CERT for \
                     a private CA)",
                ),
                Ok(redis::ConnectionAddr::TcpTls { .. }) => {
                    ok("redis tls", format!("{display}: rediss:// (TLS)"))
                }
                _ => ok("redis tls", format!("{display} is this machine")),
            }
        };
        match &redis.sentinel {
            None => findings.push(judge(&redis.display, redis.url.expose())),
            Some(sentinel) => {
                // The sentinels, each; the master (its host known only once resolved) is
                // judged as if it were where the first sentinel is, with REDIS_URL's scheme.
                for url in &sentinel.urls {
                    findings.push(judge(&redact_url(url.expose()), url.expose()));
                }
                let near = sentinel.urls[0]
                    .expose()
                    .into_connection_info()
                    .ok()
                    .and_then(|info| match info.addr() {
                        redis::ConnectionAddr::Tcp(host, _)
                        | redis::ConnectionAddr::TcpTls { host, .. } => Some(host.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| "localhost".into());
                let scheme = redis.url.expose().split("://").next().unwrap_or("redis");
                let master = format!("{scheme}://{near}");
                findings.push(judge(&format!("master {}", sentinel.master), &master));
            }
        }
    }
    findings
}

/// `pg_settings` in bytes (memory) or as written (the rest).
struct PgSettings(HashMap<String, (String, Option<String>)>);

impl PgSettings {
    fn bytes(&self, name: &str) -> Option<u64> {
        let (value, unit) = self.0.get(name)?;
        let value: u64 = value.parse().ok()?;
        let unit = match unit.as_deref()? {
            "B" => 1,
            "kB" => 1 << 10,
            "8kB" => 8 << 10,
            "MB" => MB,
            "GB" => 1 << 30,
            _ => return None,
        };
        Some(value * unit)
    }

    fn number(&self, name: &str) -> Option<f64> {
        self.0.get(name)?.0.parse().ok()
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{} MB", bytes / MB)
}

/// PostgreSQL's settings against seed 002's, and its connection limit against the pools of
/// `instances` instances.
pub async fn postgres(
    client: &impl cascade_core::db::Sql,
    pool_max: usize,
    instances: u32,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1)",
            &[&vec![
                "shared_buffers",
                "effective_cache_size",
                "work_mem",
                "random_page_cost",
                "max_connections",
                "superuser_reserved_connections",
            ]],
        )
        .await?;
    let settings = PgSettings(
        rows.iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect(),
    );
    let mut findings = Vec::new();
    let mut memory = |name: &'static str, want: u64, why: &str| {
        if let Some(have) = settings.bytes(name) {
            findings.push(if have >= want {
                ok(
                    name,
                    format!("{} (seed 002: {})", megabytes(have), megabytes(want)),
                )
            } else {
                warn(
                    name,
                    format!(
                        "{}, below seed 002's {}: {why}",
                        megabytes(have),
                        megabytes(want)
                    ),
                )
            });
        }
    };
    memory(
        "shared_buffers",
        256 * MB,
        "fewer rows stay in PostgreSQL's own memory (a quarter of the machine's memory is \
         the usual figure for a dedicated server)",
    );
    memory(
        "effective_cache_size",
        1024 * MB,
        "the planner assumes little is cached and prefers sequential scans (set it to the \
         memory the operating system caches files in)",
    );
    memory(
        "work_mem",
        16 * MB,
        "sorts and hashes (search ranking, listing pages) spill to disk sooner",
    );
    if let Some(cost) = settings.number("random_page_cost") {
        findings.push(if cost <= 2.0 {
            ok("random_page_cost", format!("{cost} (seed 002: 1.1)"))
        } else {
            warn(
                "random_page_cost",
                format!(
                    "{cost}: a spinning disk's figure; on SSDs set 1.1 (seed 002) or the \
                     planner avoids index scans it should use"
                ),
            )
        });
    }
    if let Some(max) = settings.number("max_connections") {
        let max = max as u64;
        let reserved = settings
            .number("superuser_reserved_connections")
            .unwrap_or(3.0) as u64;
        let per_instance = pool_max as u64 + LISTENERS_PER_INSTANCE;
        let needed = per_instance * u64::from(instances);
        let usable = max.saturating_sub(reserved);
        let sum = format!(
            "{instances} instance(s) × (PG_POOL_MAX {pool_max} + {LISTENERS_PER_INSTANCE} \
             listeners) = {needed}, of max_connections {max} less {reserved} reserved = {usable}"
        );
        findings.push(if needed <= usable {
            ok("connections", sum)
        } else {
            warn(
                "connections",
                format!(
                    "{sum}: the last instances to start wait for connections and time out; \
                     raise max_connections, lower PG_POOL_MAX, or put PgBouncer in front"
                ),
            )
        });
    }
    Ok(findings)
}

/// Behind PgBouncer the pool cannot set `statement_timeout` at connect (PgBouncer refuses the
/// `options` startup parameter): the role's or database's setting, `setting` as the server
/// reports it, is what bounds a stuck request statement.
pub fn pooled_statement_timeout(setting: &str) -> Finding {
    if setting == "0" {
        warn(
            "statement_timeout",
            "0 behind PgBouncer: a stuck statement holds its server connection forever \
             (ALTER ROLE <user> SET statement_timeout = '10s'; Cascade cannot set it at \
             connect through PgBouncer)",
        )
    } else {
        ok(
            "statement_timeout",
            format!("{setting} (the role's, behind PgBouncer)"),
        )
    }
}

/// The settings [`redis_settings`] judges, read one name per `CONFIG GET` (several names in
/// one call need Redis 7).
pub const REDIS_SETTINGS: [&str; 5] = [
    "maxmemory",
    "maxmemory-policy",
    "appendonly",
    "appendfsync",
    "save",
];

/// The finding when a server does not let us read its settings.
fn redis_config_refused(err: impl std::fmt::Display) -> Finding {
    warn(
        "redis config",
        format!(
            "cannot read its settings ({err}; CONFIG may be renamed or not granted to this \
             user): check maxmemory and maxmemory-policy by hand"
        ),
    )
}

/// Redis's memory limit, eviction policy and persistence against what the cache needs. On a
/// Redis Cluster this reaches one node only: `cascade check` reviews each node instead
/// (`redis_cluster.rs`).
pub async fn redis(redis: &Redis) -> Vec<Finding> {
    let info = scripts_info(redis).await;
    let mut settings: HashMap<String, String> = HashMap::new();
    for name in REDIS_SETTINGS {
        match redis
            .query::<HashMap<String, String>>(redis::cmd("CONFIG").arg("GET").arg(name))
            .await
        {
            Ok(pair) => settings.extend(pair),
            Err(err) => return vec![redis_config_refused(err), info],
        }
    }
    let mut findings = redis_settings(&settings);
    findings.push(info);
    findings
}

/// Whether the cache's scripts may read `INFO` (`cache::scripts_read_info`): a speculative
/// load's store needs Redis's eviction count, and stores nothing without it.
async fn scripts_info(redis: &Redis) -> Finding {
    match cascade_core::cache::scripts_read_info(redis).await {
        Ok(true) => ok(
            "redis info",
            "scripts read INFO stats and INFO server: a cold read's store can tell whether \
             Redis evicted keys (tombstones among them)",
        ),
        Ok(false) => warn(
            "redis info",
            "scripts cannot read INFO's evicted_keys and run_id (an ACL without +info, a \
             renamed command, or a server whose INFO lacks them): \
             cold reads store nothing speculatively and wait for a lookup and its lease; \
             grant +info to this user (ACL SETUSER <user> +info), or set \
             CACHE_SPECULATIVE_LOADS=false",
        ),
        Err(err) => warn(
            "redis info",
            format!(
                "the probe script failed ({err}); if this user may not run scripts (EVAL \
                 and EVALSHA, +@scripting), no cache step can run"
            ),
        ),
    }
}

/// [`REDIS_SETTINGS`] of one server, as read by `CONFIG GET`, against what the cache needs.
pub fn redis_settings(settings: &HashMap<String, String>) -> Vec<Finding> {
    let get = |name: &str| settings.get(name).map(String::as_str).unwrap_or("");
    let mut findings = Vec::new();
    let limit: u64 = get("maxmemory").parse().unwrap_or(0);
    let policy = get("maxmemory-policy");
    findings.push(if limit == 0 {
        warn(
            "maxmemory",
            "0 (no limit): the cache grows until the machine runs out of memory and the \
             kernel kills Redis; set maxmemory to the memory Redis may use",
        )
    } else {
        ok("maxmemory", megabytes(limit))
    });
    findings.push(match policy {
        "allkeys-lru" | "allkeys-lfu" => ok(
            "eviction",
            format!(
                "{policy}: the least used entries make room for new ones (while it evicts, \
                 reads of cold keys take their lease: no speculative load is stored)"
            ),
        ),
        "noeviction" => warn(
            "eviction",
            "noeviction: at the limit Redis refuses writes, so cache fills fail (reads fall \
             through to PostgreSQL) and real-time history stops growing; set allkeys-lru or \
             allkeys-lfu",
        ),
        "volatile-ttl" | "volatile-random" | "allkeys-random" => warn(
            "eviction",
            format!(
                "{policy}: under pressure it evicts the shortest-lived keys first, or any at random, \
                 leases among them (concurrent misses of a key then load it more than once); \
                 set allkeys-lru or allkeys-lfu"
            ),
        ),
        other => ok(
            "eviction",
            format!(
                "{other}: evicts under pressure (keys without an expiry are never evicted by \
                 volatile-* policies; Cascade's cache entries all have one)"
            ),
        ),
    });
    let aof = get("appendonly") == "yes";
    findings.push(if aof && get("appendfsync") == "always" {
        warn(
            "persistence",
            "appendonly with appendfsync always: every cache fill and invalidation waits for a \
             disk flush, and nothing Cascade keeps in Redis needs it (accounts, sessions and \
             data live in PostgreSQL); use appendfsync everysec or no persistence",
        )
    } else {
        ok(
            "persistence",
            format!(
                "appendonly {}, save {:?}: Cascade keeps nothing in Redis that PostgreSQL \
                 cannot rebuild; persistence only shortens the refill after a restart",
                if aof { "yes" } else { "no" },
                get("save")
            ),
        )
    });
    findings
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn sentinels_and_their_master_over_plain_text_to_another_machine_are_flagged() {
        use cascade_core::config::{Config, Parser, RawConfig};
        let findings = |sentinels: &str, master_url: Option<&str>| {
            let mut raw = RawConfig::default();
            raw.redis.redis_sentinel_urls = Some(sentinels.into());
            raw.redis.redis_url = master_url.map(Into::into);
            let config = Config::parse(&mut Parser::new(), &raw, &[]);
            super::tls(&config.database, config.redis.as_ref())
                .into_iter()
                .filter(|f| f.name == "redis tls")
                .map(|f| (f.ok, f.detail))
                .collect::<Vec<_>>()
        };
        let remote = findings("redis://:pw@10.0.0.21:26379,rediss://10.0.0.22:26379", None);
        assert_eq!(remote.len(), 3, "{remote:?}");
        assert!(
            !remote[0].0 && remote[0].1.contains("10.0.0.21"),
            "{remote:?}"
        );
        assert!(!remote[0].1.contains("pw@"), "{remote:?}");
        assert!(remote[1].0, "{remote:?}");
        assert!(
            !remote[2].0 && remote[2].1.contains("master mymaster"),
            "{remote:?}"
        );
        let tls = findings("rediss://10.0.0.21:26379", Some("rediss://app:pw@x"));
        assert!(tls.iter().all(|(ok, _)| *ok), "{tls:?}");
        let local = findings("redis://127.0.0.1:26379", None);
        assert!(local.iter().all(|(ok, _)| *ok), "{local:?}");
    }

    #[test]
    fn loopback_hosts_are_this_machine_and_others_are_not() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "10.0.0.5",
            "db.example.com",
            "192.168.1.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
