//! PostgreSQL: where it is (a URL, its parts, or the embedded default) and the pool's bounds.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::parser::{Parser, SECOND};
use super::values::redact_url;
use crate::db::Pooler;
use crate::db::tls::PgTls;

/// `DATABASE_URL` and its aliases, the pool's sizes and deadlines.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawDatabase {
    /// PostgreSQL URL (postgresql://user:password@host:port/db). Unset: a private embedded
    /// PostgreSQL is started from the installed server binaries.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Alias of DATABASE_URL (seed 003).
    #[arg(long, env = "PG_URL", global = true, hide_env_values = true)]
    pub pg_url: Option<String>,
    /// PostgreSQL host, used when no URL is given (seed 002).
    #[arg(long, env = "POSTGRES_HOST", global = true)]
    pub postgres_host: Option<String>,
    /// PostgreSQL port, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_PORT", global = true)]
    pub postgres_port: Option<String>,
    /// PostgreSQL database, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_DB", global = true)]
    pub postgres_db: Option<String>,
    /// PostgreSQL user, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_USER", global = true)]
    pub postgres_user: Option<String>,
    /// PostgreSQL password, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_PASSWORD", global = true, hide_env_values = true)]
    pub postgres_password: Option<String>,
    /// Connections kept open in the pool [default: 2].
    #[arg(long, env = "PG_POOL_MIN", global = true)]
    pub pg_pool_min: Option<String>,
    /// Most connections the pool opens [default: 20].
    #[arg(long, env = "PG_POOL_MAX", global = true)]
    pub pg_pool_max: Option<String>,
    /// Alias of PG_POOL_MIN (seed 002).
    #[arg(long, env = "POSTGRES_POOL_MIN_SIZE", global = true)]
    pub postgres_pool_min_size: Option<String>,
    /// Alias of PG_POOL_MAX (seed 002).
    #[arg(long, env = "POSTGRES_POOL_MAX_SIZE", global = true)]
    pub postgres_pool_max_size: Option<String>,
    /// How long a request waits for a pool connection before failing with 503 [default: 2s].
    #[arg(long, env = "PG_ACQUIRE_TIMEOUT", global = true)]
    pub pg_acquire_timeout: Option<String>,
    /// Server-side statement_timeout of request connections [default: 10s].
    #[arg(long, env = "PG_STATEMENT_TIMEOUT", global = true)]
    pub pg_statement_timeout: Option<String>,
    /// Deadline of one connection attempt [default: 3s].
    #[arg(long, env = "PG_CONNECT_TIMEOUT", global = true)]
    pub pg_connect_timeout: Option<String>,
    /// Total time startup keeps retrying PostgreSQL before exiting [default: 30s].
    #[arg(long, env = "PG_STARTUP_TIMEOUT", global = true)]
    pub pg_startup_timeout: Option<String>,
    /// What stands between Cascade and PostgreSQL: pgbouncer (a transaction-mode pooler:
    /// unnamed statements, no session state), none, or auto (ask the server at start)
    /// [default: auto].
    #[arg(long, env = "PG_POOLER", global = true)]
    pub pg_pooler: Option<String>,
    /// PostgreSQL itself, bypassing PgBouncer, for migrations and LISTEN (same form as
    /// DATABASE_URL). Unset: they use DATABASE_URL.
    #[arg(
        long,
        env = "DATABASE_DIRECT_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_direct_url: Option<String>,
    /// Data directory of the embedded PostgreSQL [default: ./.cascade].
    #[arg(long, env = "CASCADE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

/// Where PostgreSQL comes from.
#[derive(Debug, Clone)]
pub enum DatabaseSource {
    /// A server the user runs, from DATABASE_URL, PG_URL or POSTGRES_*.
    External {
        config: Box<tokio_postgres::Config>,
        /// The URL with its password redacted, for logs and `cascade config`.
        display: String,
        /// `host:port` as the user wrote it, for errors that must name the address.
        address: String,
        /// `sslmode` and `sslrootcert` of the URL (libpq's meanings: [`PgTls`]).
        tls: PgTls,
    },
    /// A private PostgreSQL started from the installed binaries in this directory.
    Embedded { data_dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub source: DatabaseSource,
    pub pool_min: usize,
    pub pool_max: usize,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
    pub connect_timeout: Duration,
    pub startup_timeout: Duration,
    /// `PG_POOLER`: `Auto` is resolved when the pool connects.
    pub pooler: Pooler,
    /// `DATABASE_DIRECT_URL`: where migrations and `LISTEN` connect, bypassing a pooler.
    pub direct: Option<DatabaseSource>,
}

impl DatabaseConfig {
    pub(super) fn parse(p: &mut Parser, raw: &RawDatabase) -> DatabaseConfig {
        let source = if let Some((var, url)) = raw
            .database_url
            .as_ref()
            .map(|u| ("DATABASE_URL", u))
            .or(raw.pg_url.as_ref().map(|u| ("PG_URL", u)))
        {
            Self::url(p, var, url)
        } else if let Some(host) = &raw.postgres_host {
            let port: u16 = p.number(
                "POSTGRES_PORT",
                raw.postgres_port.as_deref(),
                5432,
                "a TCP port number",
            );
            let mut config = tokio_postgres::Config::new();
            config
                .host(host)
                .port(port)
                .dbname(raw.postgres_db.as_deref().unwrap_or("cascade"))
                .user(raw.postgres_user.as_deref().unwrap_or("postgres"));
            if let Some(password) = &raw.postgres_password {
                config.password(password);
            }
            DatabaseSource::External {
                display: format!(
                    "postgresql://{}{}@{host}:{port}/{}",
                    raw.postgres_user.as_deref().unwrap_or("postgres"),
                    if raw.postgres_password.is_some() {
                        ":***"
                    } else {
                        ""
                    },
                    raw.postgres_db.as_deref().unwrap_or("cascade")
                ),
                address: format!("{host}:{port}"),
                config: Box::new(config),
                tls: PgTls::default(),
            }
        } else {
            DatabaseSource::Embedded {
                data_dir: raw
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(".cascade")),
            }
        };

        let pool_min_raw = raw
            .pg_pool_min
            .as_deref()
            .or(raw.postgres_pool_min_size.as_deref());
        let pool_max_raw = raw
            .pg_pool_max
            .as_deref()
            .or(raw.postgres_pool_max_size.as_deref());
        let pool_min_var = if raw.pg_pool_min.is_some() || raw.postgres_pool_min_size.is_none() {
            "PG_POOL_MIN"
        } else {
            "POSTGRES_POOL_MIN_SIZE"
        };
        let pool_max_var = if raw.pg_pool_max.is_some() || raw.postgres_pool_max_size.is_none() {
            "PG_POOL_MAX"
        } else {
            "POSTGRES_POOL_MAX_SIZE"
        };
        let pool_min: usize = p.number(
            pool_min_var,
            pool_min_raw,
            2,
            "a whole number of connections",
        );
        let pool_max: usize = p.number(
            pool_max_var,
            pool_max_raw,
            20,
            "a whole number of connections",
        );
        if pool_max == 0 {
            p.fail(pool_max_var, "must be at least 1");
        } else if pool_min > pool_max {
            p.fail(
                pool_min_var,
                format!("must not exceed {pool_max_var} (got {pool_min} > {pool_max})"),
            );
        }

        let pooler = match raw.pg_pooler.as_deref().map(str::trim) {
            None | Some("auto") => Pooler::Auto,
            Some("pgbouncer") => Pooler::PgBouncer,
            Some("none") => Pooler::None,
            Some(other) => {
                p.fail(
                    "PG_POOLER",
                    format!("expected pgbouncer, none or auto, got {other:?}"),
                );
                Pooler::Auto
            }
        };
        let direct = raw
            .database_direct_url
            .as_ref()
            .filter(|url| !url.trim().is_empty())
            .map(|url| Self::url(p, "DATABASE_DIRECT_URL", url));
        if direct.is_some() && matches!(source, DatabaseSource::Embedded { .. }) {
            p.fail(
                "DATABASE_DIRECT_URL",
                "needs DATABASE_URL (the embedded PostgreSQL has no pooler in front)",
            );
        }

        DatabaseConfig {
            source,
            pooler,
            direct,
            pool_min,
            pool_max,
            acquire_timeout: p.positive_duration(
                "PG_ACQUIRE_TIMEOUT",
                &raw.pg_acquire_timeout,
                2 * SECOND,
            ),
            statement_timeout: p.positive_duration(
                "PG_STATEMENT_TIMEOUT",
                &raw.pg_statement_timeout,
                10 * SECOND,
            ),
            connect_timeout: p.positive_duration(
                "PG_CONNECT_TIMEOUT",
                &raw.pg_connect_timeout,
                3 * SECOND,
            ),
            startup_timeout: p.positive_duration(
                "PG_STARTUP_TIMEOUT",
                &raw.pg_startup_timeout,
                30 * SECOND,
            ),
        }
    }

    fn url(p: &mut Parser, var: &'static str, url: &str) -> DatabaseSource {
        DatabaseSource::from_url(url).unwrap_or_else(|why| {
            p.fail(var, why);
            DatabaseSource::Embedded {
                data_dir: PathBuf::new(),
            }
        })
    }
}

impl DatabaseSource {
    /// The server at `url` (`postgresql://user:password@host:port/db`, with libpq's `sslmode`
    /// and `sslrootcert`: [`PgTls`]), or why the URL is not one.
    pub fn from_url(url: &str) -> Result<DatabaseSource, String> {
        let expected = "expected postgresql://user:password@host:port/database";
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            // Not echoed: text without a scheme may be the tail of a password that held a
            // comma (DATABASE_REPLICA_URLS is split on commas).
            let got = match url.split_once("://") {
                Some((scheme, _)) => format!("a {scheme:?} URL"),
                None => "text that is not a URL (not shown: it may be part of a password; \
                         write a comma in a password as %2C)"
                    .to_string(),
            };
            return Err(format!("{expected}, got {got}"));
        }
        let (rest, tls) = PgTls::split_url(url)?;
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|err| format!("{expected}: {err}"))?;
        let Some(first) = config.get_hosts().first() else {
            return Err(format!("{expected}: the URL names no host"));
        };
        let host = match first {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        config.ssl_mode(tls.tokio_mode());
        Ok(DatabaseSource::External {
            display: redact_url(url),
            address: format!("{host}:{port}"),
            config: Box::new(config),
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_fragment_is_never_echoed() {
        // `postgresql://u:se,cret@h/db` split on the comma leaves `cret@h/db`.
        let Err(why) = DatabaseSource::from_url("cret@h/db") else {
            panic!("a fragment parsed as a URL");
        };
        assert!(!why.contains("cret"), "{why}");
    }
}
