//! `cascade serve` and `cascade migrate`: bring up PostgreSQL (external or embedded), apply
//! migrations, connect Redis, serve until SIGTERM/SIGINT, then drain and stop cleanly.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use cascade_core::cache::{Backend, Cache, EngineOptions};
use cascade_core::config::{CacheBackend, Config, DatabaseSource};
use cascade_core::db::{self, Db, EmbeddedPostgres};
use cascade_core::redis::Redis;
use cascade_core::shutdown::Shutdown;
use cascade_server::state::AppState;

/// PostgreSQL as configured: the pool, plus the embedded server when we started one (it is
/// stopped when this is dropped).
pub(crate) struct Database {
    pub(crate) db: Db,
    _embedded: Option<EmbeddedPostgres>,
}

pub(crate) async fn open_database(config: &Config) -> anyhow::Result<Database> {
    let (pg_config, address, embedded) = match &config.database.source {
        DatabaseSource::External {
            config: pg,
            address,
            ..
        } => ((**pg).clone(), address.clone(), None),
        DatabaseSource::Embedded { data_dir } => {
            tracing::info!(dir = %data_dir.display(), "no DATABASE_URL: starting the embedded PostgreSQL");
            let embedded =
                EmbeddedPostgres::start(data_dir, config.database.startup_timeout).await?;
            (embedded.pg_config(), embedded.address(), Some(embedded))
        }
    };
    let db = Db::connect(&config.database, pg_config, address).await?;
    Ok(Database {
        db,
        _embedded: embedded,
    })
}

pub(crate) async fn apply_migrations(db: &Db) -> anyhow::Result<()> {
    let report = db::migrate(db.maintenance_config())
        .await
        .context("applying migrations")?;
    tracing::info!(
        applied = ?report.applied,
        already_applied = report.already_applied.len(),
        "database schema is up to date"
    );
    Ok(())
}

pub async fn migrate_only(config: Config) -> anyhow::Result<ExitCode> {
    let database = open_database(&config).await?;
    apply_migrations(&database.db).await?;
    database.db.close();
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

pub async fn run(config: Config, migrate: bool) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Bind first: a taken port is reported before we spend time starting PostgreSQL.
    let listener = tokio::net::TcpListener::bind((config.http.host.as_str(), config.http.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.http.host, config.http.port))?;
    let local = listener.local_addr()?;

    let database = open_database(&config).await?;
    if migrate {
        apply_migrations(&database.db).await?;
    }

    let redis = match &config.redis {
        Some(redis_config) => {
            let redis = Redis::new(redis_config)?;
            let health = redis.health().await;
            if health.up {
                tracing::info!(url = redis.display(), "Redis connected");
            } else {
                tracing::warn!(
                    url = redis.display(),
                    error = health.error.as_deref().unwrap_or(""),
                    "Redis is not reachable; serving without it and reconnecting in the background"
                );
            }
            Some(redis)
        }
        None => {
            tracing::info!("no REDIS_URL: running without Redis (in-process cache tier only)");
            None
        }
    };
    if config.jwt_secret.is_none() {
        tracing::warn!(
            "JWT_SECRET is not set: tokens are signed with a random key that dies with this process"
        );
    }

    let shutdown = Shutdown::new();
    let maintenance = tokio::spawn(pool_maintenance(database.db.clone(), shutdown.signal()));

    let backend = match (config.cache.backend, &redis) {
        (CacheBackend::Redis, Some(redis)) => Backend::Redis(redis.clone()),
        (CacheBackend::Postgres, _) => Backend::Postgres(database.db.clone()),
        _ => Backend::Memory,
    };
    tracing::info!(backend = ?config.cache.backend, "cache engine ready");
    let cache = Cache::new(config.cache.clone(), backend, EngineOptions::default());
    let cleanup = tokio::spawn(
        cache
            .clone()
            .run_cleanup(config.cache.cleanup_interval, shutdown.signal()),
    );
    let session_cleanup_interval = config.session_cleanup_interval;
    let state = AppState::new(config, database.db.clone(), redis, cache, started);
    let session_cleanup = tokio::spawn(
        state
            .identity
            .clone()
            .run_cleanup(session_cleanup_interval, shutdown.signal()),
    );
    let metrics_upkeep = tokio::spawn(
        state
            .metrics
            .clone()
            .run_upkeep(Duration::from_secs(5), shutdown.signal()),
    );
    let drain = state.config.http.shutdown_timeout;
    tracing::info!(address = %local, startup_ms = started.elapsed().as_millis() as u64, "cascade is serving");
    println!("cascade listening on http://{local}");

    cascade_server::serve(listener, state, termination(), drain).await?;

    shutdown.trigger();
    let _ = maintenance.await;
    let _ = cleanup.await;
    let _ = session_cleanup.await;
    let _ = metrics_upkeep.await;
    database.db.close();
    drop(database);
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Keeps `PG_POOL_MIN` connections open, so a restarted PostgreSQL gets its warm pool back.
async fn pool_maintenance(db: Db, mut stop: cascade_core::shutdown::ShutdownSignal) {
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => db.top_up().await,
        }
    }
}

/// `cascade cache invalidate`: removes entries from the shared tier (Redis or PostgreSQL), which every
/// instance reads, so the next read anywhere loads fresh data.
pub async fn cache_invalidate(
    config: Config,
    target: crate::CacheTarget,
) -> anyhow::Result<ExitCode> {
    let mut _database = None;
    let backend = match (config.cache.backend, &config.redis) {
        (CacheBackend::Redis, Some(redis_config)) => {
            let redis = Redis::new(redis_config)?;
            if !redis.health().await.up {
                anyhow::bail!("Redis at {} does not answer", redis.display());
            }
            Backend::Redis(redis)
        }
        (CacheBackend::Postgres, _) => {
            let database = open_database(&config).await?;
            let backend = Backend::Postgres(database.db.clone());
            _database = Some(database);
            backend
        }
        _ => {
            eprintln!(
                "cascade: the cache backend is memory: each server process holds its own entries, \
                 so there is no shared tier to invalidate from outside (restart the server, or set \
                 REDIS_URL or CACHE_BACKEND=postgres)"
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let cache = Cache::new(config.cache.clone(), backend, EngineOptions::default());
    let what = match (target.tag, target.ns, target.key) {
        (Some(tag), _, _) => {
            cache.invalidate_tag(&tag).await;
            format!("tag {tag}")
        }
        (_, Some(ns), _) => {
            cache.invalidate_namespace(&ns).await;
            format!("namespace {ns}")
        }
        (_, _, Some(key)) => {
            let Some((ns, key)) = key.split_once(':') else {
                eprintln!("cascade: --key takes NAMESPACE:KEY, e.g. assets:v1");
                return Ok(ExitCode::from(2));
            };
            cache.invalidate(ns, key).await;
            format!("key {ns}:{key}")
        }
        _ => unreachable!("clap requires one of --tag, --ns, --key"),
    };
    if cache.stats().iter().any(|s| s.shared_errors > 0) {
        anyhow::bail!("Redis failed while invalidating {what}");
    }
    println!("invalidated {what}");
    Ok(ExitCode::SUCCESS)
}
