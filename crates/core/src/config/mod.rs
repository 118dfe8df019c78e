//! Configuration: one typed struct, parsed once from flags, the environment and `.env`.
//!
//! The core parses the platform's settings only, one file per group: [`database`],
//! [`redis`], [`cache`], [`identity`], [`http`]. An application module parses its own with the
//! same [`Parser`] and registers its cache [`Namespace`]s, so every problem of every group is
//! reported at once, each naming its variable, before anything connects. Every raw field has a
//! `--flag` and the seeds' env var, so `cascade --help` documents them all.

mod cache;
mod database;
mod http;
mod identity;
mod parser;
mod redis;
mod replica;
mod values;

use std::time::Duration;

pub use cache::{CacheBackend, CacheConfig, DEFAULT_MEMORY_BYTES, Namespace, RawCache};
pub use database::{DatabaseConfig, DatabaseSource, RawDatabase};
pub use http::{HttpConfig, LogFormat, RawHttp};
pub use identity::{AuthConfig, LoginBackoff, RateLimit, RawIdentity};
pub use parser::Parser;
pub use redis::{ClusterNodes, RawRedis, RedisConfig, SentinelConfig};
pub use replica::{RawReplicas, ReplicaConfig};
pub use values::{Decimal6, Secret, parse_duration, redact_url};

/// Everything the platform reads from flags and the environment, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawConfig {
    #[command(flatten)]
    pub database: RawDatabase,
    #[command(flatten)]
    pub replicas: RawReplicas,
    #[command(flatten)]
    pub redis: RawRedis,
    #[command(flatten)]
    pub cache: RawCache,
    #[command(flatten)]
    pub identity: RawIdentity,
    #[command(flatten)]
    pub http: RawHttp,
}

/// One configuration problem: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigIssue {
    pub var: &'static str,
    pub message: String,
}

/// Every problem found in the configuration; startup refuses to go on while there is one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<ConfigIssue>);

/// The validated platform configuration. Holding one means every value was checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub http: HttpConfig,
    pub log_format: LogFormat,
    pub database: DatabaseConfig,
    /// Read replicas of the primary (`DATABASE_REPLICA_URLS`): none by default.
    pub replicas: ReplicaConfig,
    pub redis: Option<RedisConfig>,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
}

/// The core's own cache namespaces: login sessions (seed 000's `cascade:session:{id}`).
pub fn core_namespaces() -> Vec<Namespace> {
    vec![Namespace::new(crate::identity::SESSIONS, Duration::from_secs(1800)).keyed("session")]
}

/// Reads `.env` from the working directory into the environment (values already set win).
pub fn load_dotenv() {
    // A missing .env is normal; a malformed one is worth a warning, not a refusal.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("warning: .env could not be read: {err}");
    }
}

impl Config {
    /// Validates the platform configuration alone, reporting every problem at once. It knows
    /// the core's cache namespaces only: a tool that builds a cache must parse the composed
    /// settings (`cascade_server::Settings`), or its keys will not match the server's.
    pub fn from_raw(raw: &RawConfig) -> Result<Config, ConfigError> {
        let mut p = Parser::new();
        let config = Config::parse(&mut p, raw, &[]);
        p.finish(config)
    }

    /// Parses into `p`, with the cache namespaces the modules registered (the core's own are
    /// added here).
    pub fn parse(p: &mut Parser, raw: &RawConfig, module_namespaces: &[Namespace]) -> Config {
        let namespaces: Vec<Namespace> = core_namespaces()
            .into_iter()
            .chain(module_namespaces.iter().cloned())
            .collect();
        let database = DatabaseConfig::parse(p, &raw.database);
        let replicas = ReplicaConfig::parse(p, &raw.replicas, &database.source);
        let redis = RedisConfig::parse(p, &raw.redis);
        let cache = CacheConfig::parse(
            p,
            &raw.cache,
            redis.is_some(),
            raw.redis.redis_url.is_some(),
            &namespaces,
        );
        if redis.as_ref().is_some_and(|r| r.cluster.is_some())
            && cache.key_prefix.contains(['{', '}'])
        {
            // The cache puts a hash tag right after the prefix (its slot bucket): a brace
            // in the prefix would make Redis hash something else.
            p.fail(
                "CACHE_KEY_PREFIX",
                "must not contain { or } with REDIS_CLUSTER_URLS (the cache adds its own hash tags)",
            );
        }
        let (http, log_format) = HttpConfig::parse(p, &raw.http);
        let auth = AuthConfig::parse(p, &raw.identity);
        Config {
            http,
            log_format,
            database,
            replicas,
            redis,
            cache,
            auth,
        }
    }

    /// The effective configuration as `(VARIABLE, value)` rows, secrets redacted. This is
    /// what `cascade config` and `cascade check` print.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        let limit = |l: Option<RateLimit>| l.map_or_else(|| "off".to_string(), |l| l.to_string());
        let mut rows = vec![
            ("HOST", self.http.host.clone()),
            ("PORT", self.http.port.to_string()),
            ("REQUEST_TIMEOUT", secs(self.http.request_timeout)),
            ("BODY_LIMIT_BYTES", self.http.body_limit_bytes.to_string()),
            ("SHUTDOWN_TIMEOUT", secs(self.http.shutdown_timeout)),
            ("HEADER_READ_TIMEOUT", secs(self.http.header_read_timeout)),
            ("IDLE_TIMEOUT", secs(self.http.idle_timeout)),
            ("MAX_CONNECTIONS", self.http.max_connections.to_string()),
            (
                "ADMIN_TOKEN",
                match &self.http.admin_token {
                    Some(_) => "*** (set)".into(),
                    None => "(not set: /health/db answers 403)".into(),
                },
            ),
            (
                "LOG_FORMAT",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
        ];
        match &self.database.source {
            DatabaseSource::External { display, .. } => {
                rows.push(("DATABASE_URL", display.clone()))
            }
            DatabaseSource::Embedded { data_dir } => {
                rows.push(("DATABASE_URL", "(not set: embedded PostgreSQL)".into()));
                rows.push(("CASCADE_DATA_DIR", data_dir.display().to_string()));
            }
        }
        let db = &self.database;
        rows.extend([
            ("PG_POOL_MIN", db.pool_min.to_string()),
            ("PG_POOL_MAX", db.pool_max.to_string()),
            ("PG_ACQUIRE_TIMEOUT", secs(db.acquire_timeout)),
            ("PG_STATEMENT_TIMEOUT", secs(db.statement_timeout)),
            ("PG_CONNECT_TIMEOUT", secs(db.connect_timeout)),
            ("PG_STARTUP_TIMEOUT", secs(db.startup_timeout)),
            ("PG_POOLER", db.pooler.name().to_string()),
        ]);
        if let Some(DatabaseSource::External { display, .. }) = &db.direct {
            rows.push(("DATABASE_DIRECT_URL", display.clone()));
        }
        rows.extend(self.replicas.describe());
        match &self.redis {
            Some(r) => {
                match (&r.sentinel, &r.cluster) {
                    (Some(s), _) => {
                        rows.push(("REDIS_SENTINEL_URLS", s.display.clone()));
                        rows.push(("REDIS_SENTINEL_MASTER", s.master.clone()));
                    }
                    (None, Some(c)) => rows.push(("REDIS_CLUSTER_URLS", c.display.clone())),
                    (None, None) => rows.push(("REDIS_URL", r.display.clone())),
                }
                rows.push(("REDIS_TIMEOUT", secs(r.timeout)));
                if let Some(ca) = &r.ca_cert {
                    rows.push(("REDIS_CA_CERT", ca.display().to_string()));
                }
            }
            None => rows.push(("REDIS_URL", "(not set: in-process cache only)".into())),
        }
        let c = &self.cache;
        rows.extend([
            ("CACHE_BACKEND", format!("{:?}", c.backend).to_lowercase()),
            (
                "CACHE_TTLS",
                c.ttls
                    .iter()
                    .map(|(ns, ttl)| format!("{ns}={}", secs(*ttl)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            ("CACHE_DEFAULT_TTL", secs(c.default_ttl)),
            ("CACHE_CLEANUP_INTERVAL", secs(c.cleanup_interval)),
            ("CACHE_KEY_PREFIX", c.key_prefix.clone()),
            ("CACHE_SPECULATIVE_LOADS", c.speculative_loads.to_string()),
            ("CACHE_MEMORY_BYTES", c.memory_bytes.to_string()),
            (
                "CACHE_EARLY_REFRESH",
                c.early_refresh
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("SESSION_DEFAULT_TTL", secs(self.auth.session_default_ttl)),
            (
                "SESSION_CLEANUP_INTERVAL",
                secs(self.auth.session_cleanup_interval),
            ),
            (
                "JWT_SECRET",
                match &self.auth.jwt_secret {
                    Some(_) => "*** (set)".into(),
                    None => "(not set: random per-process key)".into(),
                },
            ),
            ("ACCESS_TOKEN_TTL", secs(self.auth.access_token_ttl)),
            ("JWT_ISSUER", self.auth.issuer.clone()),
            ("JWT_AUDIENCE", self.auth.audience.clone()),
            ("RATE_LIMIT_LOGIN", limit(self.auth.login_limit)),
            ("LOGIN_BACKOFF_MAX", secs(self.auth.login_backoff_max)),
            ("RATE_LIMIT_AUTH", limit(self.auth.auth_limit)),
            ("REFRESH_GRACE", secs(self.auth.refresh_grace)),
            ("RATE_LIMIT_API", limit(self.auth.api_limit)),
        ]);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Namespaces as modules would register them.
    const NAMESPACES: &[Namespace] = &[
        Namespace::new("assets", Duration::from_secs(300)).keyed("cache:asset"),
        Namespace::new("listings", Duration::from_secs(180)),
    ];

    fn parse(f: impl FnOnce(&mut RawConfig)) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        f(&mut raw);
        let mut p = Parser::new();
        let config = Config::parse(&mut p, &raw, NAMESPACES);
        p.finish(config)
    }

    fn issue_vars(f: impl FnOnce(&mut RawConfig)) -> Vec<&'static str> {
        parse(f)
            .err()
            .map(|e| e.0.iter().map(|i| i.var).collect())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid_and_embedded() {
        let config = parse(|_| {}).expect("defaults parse");
        assert!(matches!(
            config.database.source,
            DatabaseSource::Embedded { .. }
        ));
        assert_eq!(config.cache.backend, CacheBackend::Memory);
        assert_eq!(config.cache.ttl("assets"), Duration::from_secs(300));
        assert_eq!(config.cache.ttl("listings"), Duration::from_secs(180));
        assert_eq!(config.cache.ttl("sessions"), Duration::from_secs(1800));
        assert_eq!(config.cache.key_name("assets"), "cache:asset");
        assert_eq!(config.cache.key_name("sessions"), "session");
        assert_eq!(config.cache.key_name("listings"), "listings");
        assert_eq!(config.http.port, 8000);
    }

    #[test]
    fn the_in_process_tier_is_sized_by_cache_memory_bytes() {
        let c = parse(|_| {}).expect("defaults parse");
        assert_eq!(c.cache.memory_bytes, 64 * 1024 * 1024);
        let c = parse(|r| r.cache.cache_memory_bytes = Some("268435456".into())).unwrap();
        assert_eq!(c.cache.memory_bytes, 256 * 1024 * 1024);
        let c = parse(|r| {
            r.redis.redis_url = Some("redis://127.0.0.1:6379".into());
            r.cache.cache_memory_bytes = Some("0".into());
        })
        .unwrap();
        assert_eq!(c.cache.memory_bytes, 0, "0 turns the tier off");
        for bad in ["64MB", "-1", "", "1e6", "1", "65535"] {
            assert_eq!(
                issue_vars(|r| {
                    r.redis.redis_url = Some("redis://127.0.0.1:6379".into());
                    r.cache.cache_memory_bytes = Some(bad.into());
                }),
                vec!["CACHE_MEMORY_BYTES"],
                "{bad:?} was taken"
            );
        }
        // 0 only where a shared tier caches instead: with none, nothing would be cached.
        assert_eq!(
            issue_vars(|r| r.cache.cache_memory_bytes = Some("0".into())),
            vec!["CACHE_MEMORY_BYTES"]
        );
    }

    #[test]
    fn rate_limits_parse_as_count_per_period() {
        let c = parse(|_| {}).expect("defaults parse");
        let login = c.auth.login_limit.expect("login limit on by default");
        assert_eq!((login.count, login.period), (5, Duration::from_secs(60)));
        let c = parse(|r| {
            r.identity.rate_limit_api = Some("off".into());
            r.identity.rate_limit_auth = Some("7/30s".into());
        })
        .expect("parses");
        assert_eq!(c.auth.api_limit, None);
        let auth = c.auth.auth_limit.expect("auth limit");
        assert_eq!((auth.count, auth.period), (7, Duration::from_secs(30)));
        assert_eq!(
            issue_vars(|r| r.identity.rate_limit_login = Some("five per minute".into())),
            vec!["RATE_LIMIT_LOGIN"]
        );
        assert_eq!(
            issue_vars(|r| r.identity.rate_limit_api = Some("0/1s".into())),
            vec!["RATE_LIMIT_API"]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_variable() {
        let vars = issue_vars(|r| {
            r.identity.jwt_secret = Some("short".into());
            r.database.pg_pool_min = Some("abc".into());
            r.http.port = Some("eighty".into());
            r.cache.cache_ttls_json = Some("{not json".into());
        });
        assert_eq!(
            vars,
            vec!["PG_POOL_MIN", "CACHE_TTLS_JSON", "PORT", "JWT_SECRET"]
        );
    }

    #[test]
    fn pool_min_above_max_is_refused() {
        assert_eq!(
            issue_vars(|r| {
                r.database.pg_pool_min = Some("30".into());
                r.database.pg_pool_max = Some("10".into());
            }),
            vec!["PG_POOL_MIN"]
        );
        assert_eq!(
            issue_vars(|r| r.database.postgres_pool_max_size = Some("x".into())),
            vec!["POSTGRES_POOL_MAX_SIZE"]
        );
    }

    #[test]
    fn database_url_aliases_and_parts() {
        let c = parse(|r| r.database.pg_url = Some("postgres://u:pw@db.example:6543/x".into()))
            .unwrap();
        match c.database.source {
            DatabaseSource::External {
                address, display, ..
            } => {
                assert_eq!(address, "db.example:6543");
                assert!(!display.contains("pw"));
            }
            other => panic!("expected external, got {other:?}"),
        }
        let c = parse(|r| {
            r.database.postgres_host = Some("pghost".into());
            r.database.postgres_password = Some("topsecret".into());
        })
        .unwrap();
        assert!(
            matches!(c.database.source, DatabaseSource::External { ref address, .. } if address == "pghost:5432")
        );
        assert!(!format!("{:?}", c.describe()).contains("topsecret"));
        assert_eq!(
            issue_vars(|r| r.database.database_url = Some("mysql://x".into())),
            vec!["DATABASE_URL"]
        );
        assert_eq!(
            issue_vars(|r| r.database.database_url = Some("postgresql://u@h:notaport/db".into())),
            vec!["DATABASE_URL"]
        );
    }

    #[test]
    fn replica_urls_are_parsed_like_database_url() {
        let c = parse(|r| {
            r.database.database_url = Some("postgresql://u:pw@primary:5432/db".into());
            r.replicas.database_replica_urls = Some(
                "postgresql://u:secret1@r1:5432/db, postgres://u@r2:6000/db?sslmode=require".into(),
            );
            r.replicas.database_replica_max_lag = Some("500ms".into());
        })
        .unwrap();
        let addresses: Vec<_> = c
            .replicas
            .sources
            .iter()
            .map(|s| match s {
                DatabaseSource::External { address, .. } => address.clone(),
                DatabaseSource::Embedded { .. } => String::new(),
            })
            .collect();
        assert_eq!(addresses, vec!["r1:5432", "r2:6000"]);
        assert_eq!(c.replicas.max_lag, Duration::from_millis(500));
        assert!(!format!("{:?}", c.describe()).contains("secret1"));
        assert_eq!(
            issue_vars(|r| {
                r.database.database_url = Some("postgresql://u@primary/db".into());
                r.replicas.database_replica_urls = Some("postgresql://u@r1/db,mysql://x".into());
                r.replicas.database_replica_max_lag = Some("soon".into());
            }),
            vec!["DATABASE_REPLICA_URLS", "DATABASE_REPLICA_MAX_LAG"]
        );
        assert_eq!(
            issue_vars(|r| r.replicas.database_replica_urls = Some("postgresql://u@r1/db".into())),
            vec!["DATABASE_REPLICA_URLS"]
        );
    }

    #[test]
    fn pg_pooler_and_the_direct_url_are_checked_and_described_without_secrets() {
        let c = parse(|r| {
            r.database.database_url = Some("postgresql://u:pw1@bouncer:6432/db".into());
            r.database.pg_pooler = Some("pgbouncer".into());
            r.database.database_direct_url = Some("postgresql://u:secret2@db:5432/db".into());
        })
        .unwrap();
        assert_eq!(c.database.pooler, crate::db::Pooler::PgBouncer);
        assert!(matches!(
            &c.database.direct,
            Some(DatabaseSource::External { address, .. }) if address == "db:5432"
        ));
        let described = format!("{:?}", c.describe());
        assert!(described.contains("pgbouncer") && !described.contains("secret2"));
        assert_eq!(
            parse(|_| {}).unwrap().database.pooler,
            crate::db::Pooler::Auto
        );
        assert_eq!(
            issue_vars(|r| {
                r.database.pg_pooler = Some("pgcat".into());
                r.database.database_direct_url = Some("postgresql://u@db/x".into());
            }),
            vec!["PG_POOLER", "DATABASE_DIRECT_URL"]
        );
    }

    #[test]
    fn cache_ttls_json_takes_milliseconds_of_registered_namespaces() {
        let c = parse(|r| {
            r.cache.cache_ttls_json = Some(r#"{"assets": 1500, "sessions": 60000}"#.into())
        })
        .unwrap();
        assert_eq!(c.cache.ttl("assets"), Duration::from_millis(1500));
        assert_eq!(c.cache.ttl("sessions"), Duration::from_secs(60));
        assert_eq!(c.cache.ttl("listings"), Duration::from_secs(180));
        let refused =
            parse(|r| r.cache.cache_ttls_json = Some(r#"{"asets": 1500}"#.into())).unwrap_err();
        assert_eq!(refused.0.len(), 1);
        assert_eq!(refused.0[0].var, "CACHE_TTLS_JSON");
        assert!(
            refused.0[0].message.contains("\"asets\""),
            "{}",
            refused.0[0].message
        );
        assert!(
            refused.0[0].message.contains("assets, listings, sessions"),
            "{}",
            refused.0[0].message
        );
        assert_eq!(
            issue_vars(|r| r.cache.cache_ttls_json = Some(r#"{"assets": -1}"#.into())),
            vec!["CACHE_TTLS_JSON"]
        );
        assert_eq!(
            issue_vars(|r| r.cache.cache_ttls_json = Some("[1]".into())),
            vec!["CACHE_TTLS_JSON"]
        );
    }

    #[test]
    fn redis_url_and_backend() {
        let c = parse(|r| r.redis.redis_url = Some("redis://:pw@localhost:6379/0".into())).unwrap();
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        assert!(!format!("{:?}", c.describe()).contains("pw@"));
        assert_eq!(
            issue_vars(|r| r.redis.redis_url = Some("http://nope".into())),
            vec!["REDIS_URL"]
        );
        assert_eq!(
            issue_vars(|r| r.cache.cache_backend = Some("redis".into())),
            vec!["CACHE_BACKEND"]
        );
        let c = parse(|r| r.cache.cache_backend = Some("postgres".into())).unwrap();
        assert_eq!(c.cache.backend, CacheBackend::Postgres);
    }

    #[test]
    fn redis_ca_cert_needs_rediss_and_a_file_that_exists() {
        let with = |url: &str, path: &str| {
            let (url, path) = (url.to_string(), path.to_string());
            issue_vars(move |r| {
                r.redis.redis_url = Some(url);
                r.redis.redis_ca_cert = Some(path.into());
            })
        };
        assert_eq!(
            with("redis://localhost", "/etc/hostname"),
            vec!["REDIS_CA_CERT"]
        );
        assert_eq!(
            with("rediss://localhost", "/nonexistent/ca.pem"),
            vec!["REDIS_CA_CERT"]
        );
        assert!(with("rediss://localhost", "/etc/hostname").is_empty());
    }

    #[test]
    fn redis_sentinel_urls_and_master() {
        let c = parse(|r| {
            r.redis.redis_sentinel_urls =
                Some("redis://:pw@10.0.0.1:26379, redis://10.0.0.2:26379".into());
            r.redis.redis_sentinel_master = Some("cache".into());
        })
        .unwrap();
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        let redis = c.redis.as_ref().unwrap();
        let sentinel = redis.sentinel.as_ref().unwrap();
        assert_eq!(sentinel.urls.len(), 2);
        assert_eq!(sentinel.master, "cache");
        let rows = format!("{:?}", c.describe());
        assert!(!rows.contains("pw@"), "{rows}");
        assert!(rows.contains("REDIS_SENTINEL_MASTER"), "{rows}");
        let c = parse(|r| r.redis.redis_sentinel_urls = Some("redis://h:26379".into())).unwrap();
        assert_eq!(c.redis.unwrap().sentinel.unwrap().master, "mymaster");
        assert_eq!(
            issue_vars(|r| r.redis.redis_sentinel_urls = Some("redis://h:26379,http://x".into())),
            vec!["REDIS_SENTINEL_URLS"]
        );
        assert_eq!(
            issue_vars(|r| {
                r.redis.redis_sentinel_urls = Some("redis://h:26379".into());
                r.redis.redis_sentinel_master = Some("my master".into());
            }),
            vec!["REDIS_SENTINEL_MASTER"]
        );
        // A CA certificate for TLS sentinels, the master in plain text.
        assert!(
            issue_vars(|r| {
                r.redis.redis_sentinel_urls = Some("rediss://h:26379".into());
                r.redis.redis_ca_cert = Some("/etc/hostname".into());
            })
            .is_empty()
        );
    }

    #[test]
    fn redis_cluster_urls_or_a_redis_url_of_several_nodes() {
        let c = parse(|r| {
            r.redis.redis_cluster_urls =
                Some("redis://:pw@10.0.0.1:7000, redis://10.0.0.2:7000".into());
        })
        .unwrap();
        let redis = c.redis.as_ref().unwrap();
        assert_eq!(redis.cluster.as_ref().unwrap().urls.len(), 2);
        let rows = format!("{:?}", c.describe());
        assert!(!rows.contains("pw@"), "{rows}");
        assert!(rows.contains("REDIS_CLUSTER_URLS"), "{rows}");
        let c = parse(|r| r.redis.redis_url = Some("redis://a:1,redis://b:2,redis://c:3".into()))
            .unwrap();
        assert_eq!(c.redis.unwrap().cluster.unwrap().urls.len(), 3);
        assert_eq!(
            issue_vars(|r| {
                r.redis.redis_cluster_urls = Some("redis://a:1".into());
                r.redis.redis_sentinel_urls = Some("redis://h:26379".into());
            }),
            vec!["REDIS_CLUSTER_URLS"]
        );
        assert_eq!(
            issue_vars(|r| r.redis.redis_cluster_urls = Some("redis://a:1,http://b".into())),
            vec!["REDIS_CLUSTER_URLS"]
        );
        assert_eq!(
            issue_vars(|r| {
                r.redis.redis_cluster_urls = Some("redis://a:1".into());
                r.redis.redis_url = Some("redis://b:2".into());
            }),
            vec!["REDIS_URL"]
        );
        assert_eq!(
            issue_vars(|r| {
                r.redis.redis_cluster_urls = Some("redis://a:1".into());
                r.cache.cache_key_prefix = Some("{app}:".into());
            }),
            vec!["CACHE_KEY_PREFIX"]
        );
    }
}
