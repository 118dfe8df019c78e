//! `cascade serve` and `cascade migrate`: bring up PostgreSQL (external or embedded), apply
//! migrations, connect Redis, serve until SIGTERM/SIGINT, then drain and stop cleanly.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use cascade_core::cache::{Backend, Cache, EngineOptions};
use cascade_core::config::CacheBackend;
use cascade_core::redis::Redis;
use cascade_server::application::{self, Database};
use cascade_server::{Application, BuildOptions, Settings};

pub async fn migrate_only(settings: Settings) -> anyhow::Result<ExitCode> {
    let database = Database::open(&settings.core).await?;
    application::migrate(&database.db, &application::modules(&settings)).await?;
    database.db.close();
    Ok(ExitCode::SUCCESS)
}

/// `cascade worker`: the execution workers alone, on the configured PostgreSQL, until
/// SIGTERM/SIGINT; then they stop within a bound (claims not completed by then are rescued by
/// another worker after `AGENTS_HEARTBEAT_TIMEOUT`).
pub async fn worker(settings: Settings) -> anyhow::Result<ExitCode> {
    if settings.agents.executions.workers == 0 {
        eprintln!(
            "cascade: AGENTS_WORKERS is 0: a worker process with no workers has nothing to do"
        );
        return Ok(ExitCode::from(2));
    }
    let database = Database::open(&settings.core).await?;
    // Only the `http` executor's connector is given the cache, and its calls are never cached:
    // an in-process one is enough.
    let cache = Cache::new(
        settings.core.cache.clone(),
        Backend::Memory,
        EngineOptions::default(),
    );
    let module = cascade_agents::AgentsModule::new(settings.agents.clone());
    let mut tasks = cascade_core::tasks::Supervisor::new();
    module.start_workers(&database.db, module.executors(&cache), &mut tasks);
    tracing::info!(
        workers = settings.agents.executions.workers,
        "cascade worker is running executions"
    );
    println!(
        "cascade worker running {} execution worker(s)",
        settings.agents.executions.workers
    );
    cascade_server::process::termination().await;
    tasks.stop(settings.core.http.shutdown_timeout).await;
    database.db.close();
    Ok(ExitCode::SUCCESS)
}

pub async fn run(settings: Settings, migrate: bool) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let http = &settings.core.http;
    // Bind first: a taken port is reported before we spend time starting PostgreSQL.
    let listener = tokio::net::TcpListener::bind((http.host.as_str(), http.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", http.host, http.port))?;
    let local = listener.local_addr()?;
    let app = Application::build(
        settings,
        BuildOptions {
            migrate,
            ..BuildOptions::default()
        },
    )
    .await?;
    tracing::info!(address = %local, startup_ms = started.elapsed().as_millis() as u64, "cascade is serving");
    println!("cascade listening on http://{local}");
    app.serve(listener, cascade_server::process::termination())
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `cascade cache invalidate`: removes entries from the shared tier (Redis or PostgreSQL), which every
/// instance reads, so the next read anywhere loads fresh data.
pub async fn cache_invalidate(
    settings: Settings,
    target: crate::CacheTarget,
) -> anyhow::Result<ExitCode> {
    let config = &settings.core;
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
            let database = Database::open(config).await?;
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
