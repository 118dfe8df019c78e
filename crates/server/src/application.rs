//! One way to build the application, used by `cascade serve`, the seed commands, the
//! benchmarks and the tests: PostgreSQL (external or embedded) with every module's
//! migrations, Redis when configured, the cache engine on the backend chosen once, the shared
//! state, the modules, and the background tasks under one [`Supervisor`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cascade_agents::AgentsModule;
use cascade_app::AppModule;
use cascade_catalog::CatalogModule;
use cascade_core::cache::{Backend, Cache, EngineOptions};
use cascade_core::config::{CacheBackend, Config, DatabaseSource};
use cascade_core::db::{
    self, CORE_MIGRATIONS, Db, EmbeddedPostgres, Migration, MigrationReport, ReplicaSet,
};
use cascade_core::redis::Redis;
use cascade_core::shutdown::ShutdownSignal;
use cascade_core::tasks::Supervisor;
use cascade_http::{AppState, Module};
use cascade_realtime::{Realtime, RealtimeModule};
use tokio::net::TcpListener;

use crate::http::live::Live;
use crate::http::metrics::Metrics;
use crate::http::{App, ExtraRoutes};
use crate::settings::Settings;
use crate::state::ServerState;

/// PostgreSQL as configured: the pool, plus the embedded server when one was started (it is
/// stopped when this is dropped).
pub struct Database {
    pub db: Db,
    _embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to the configured PostgreSQL, starting the embedded one when none is set.
    pub async fn open(config: &Config) -> anyhow::Result<Database> {
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
        if !db.can_listen() {
            anyhow::bail!(
                "DATABASE_URL goes through PgBouncer (PG_POOLER={}): set DATABASE_DIRECT_URL to \
                 PostgreSQL itself, for LISTEN (cache invalidation log, unified-mode bus, queue \
                 wake-ups), which PgBouncer in transaction mode cannot carry, and for migrations",
                config.database.pooler.name()
            );
        }
        if !config.replicas.sources.is_empty() {
            db.attach_replicas(ReplicaSet::new(&config.replicas, &config.database)?)?;
            tracing::info!(
                replicas = config.replicas.sources.len(),
                "read replicas configured: each joins rotation once its health probe finds it within DATABASE_REPLICA_MAX_LAG"
            );
        }
        Ok(Database {
            db,
            _embedded: embedded,
        })
    }
}

/// The modules this server composes, built from their settings (the real-time module, which
/// needs the running platform and the others' channel authorizers, is added by
/// [`Application::build`]; it has no migrations).
pub fn modules(settings: &Settings) -> Vec<Arc<dyn Module>> {
    vec![
        Arc::new(CatalogModule::new(settings.catalog.clone())),
        Arc::new(AppModule::new(settings.app.clone())),
        Arc::new(AgentsModule::new(settings.agents.clone())),
    ]
}

/// Applies the core's and every module's pending migrations.
pub async fn migrate(db: &Db, modules: &[Arc<dyn Module>]) -> anyhow::Result<MigrationReport> {
    let sets: Vec<&[Migration]> = std::iter::once(CORE_MIGRATIONS)
        .chain(modules.iter().map(|m| m.migrations()))
        .collect();
    let report = db::migrate_with(db.maintenance_config(), db.tls(), &sets)
        .await
        .context("applying migrations")?;
    tracing::info!(
        applied = ?report.applied,
        already_applied = report.already_applied.len(),
        "database schema is up to date"
    );
    Ok(report)
}

/// How to build.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Apply pending migrations (`cascade serve --no-migrate` turns it off).
    pub migrate: bool,
    /// Start the platform's and the modules' background tasks. Off for one-shot commands
    /// (`cascade billing reconcile|replay`) that use the state without serving.
    pub tasks: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            migrate: true,
            tasks: true,
        }
    }
}

impl BuildOptions {
    /// Migrations applied, no background task started: the state for a one-shot command.
    pub fn without_tasks() -> BuildOptions {
        BuildOptions {
            migrate: true,
            tasks: false,
        }
    }
}

/// The built application: its state, its modules and its running background tasks.
pub struct Application {
    pub state: AppState,
    /// Real-time channels: publish server-side messages with `realtime.publish`.
    pub realtime: Realtime,
    pub settings: Arc<Settings>,
    modules: Vec<Arc<dyn Module>>,
    metrics: Metrics,
    /// The dashboard's per-second samples (`GET /metrics/live`, the `admin:metrics` feed).
    pub live: Live,
    tasks: Supervisor,
    database: Database,
}

impl Application {
    pub async fn build(settings: Settings, options: BuildOptions) -> anyhow::Result<Application> {
        let started = Instant::now();
        let config = &settings.core;
        let database = Database::open(config).await?;
        let mut modules = modules(&settings);
        if options.migrate {
            migrate(&database.db, &modules).await?;
        }
        let redis = connect_redis(config).await?;
        if config.auth.jwt_secret.is_none() {
            tracing::warn!(
                "JWT_SECRET is not set: tokens are signed with a random key that dies with this process"
            );
        }
        let backend = Backend::choose(&config.cache, redis.as_ref(), &database.db);
        tracing::info!(backend = ?config.cache.backend, "cache engine ready");
        let engine = EngineOptions::configured(&config.cache);
        let cache = Cache::new(config.cache.clone(), backend, engine);
        // With Redis: what this instance cannot deliver there goes to PostgreSQL for the others.
        cache.log_invalidations(database.db.clone());
        let state = AppState::new(
            Arc::new(config.clone()),
            database.db.clone(),
            redis,
            cache,
            started,
        );
        let authorizers = modules
            .iter()
            .flat_map(|m| m.channel_authorizers())
            .collect();
        let realtime = Realtime::new(settings.realtime.clone(), &state, authorizers);
        modules.push(Arc::new(RealtimeModule::new(realtime.clone())));
        let metrics = Metrics::install();
        let live = Live::new(state.events.instance_id());
        let mut tasks = Supervisor::new();
        if options.tasks {
            start_platform_tasks(&state, &metrics, &mut tasks);
            let server = ServerState {
                app: state.clone(),
                metrics: metrics.clone(),
                live: live.clone(),
                realtime: realtime.clone(),
            };
            let sampler = live.clone();
            tasks.spawn("live-samples", move |stop| sampler.run(server, stop));
            let (feed, channel) = (live.subscribe(), realtime.clone());
            tasks.spawn("live-publish", move |stop| {
                crate::http::live::publish(feed, channel, stop)
            });
            for module in &modules {
                module.start_tasks(&state, &mut tasks);
            }
        }
        Ok(Application {
            state,
            realtime,
            settings: Arc::new(settings),
            modules,
            metrics,
            live,
            tasks,
            database,
        })
    }

    /// The whole HTTP application, every module's routes behind the shared middleware.
    pub fn router(&self) -> App {
        self.router_with(ExtraRoutes::default())
    }

    /// [`router`](Self::router) plus `extra` routes behind the same middleware (the
    /// benchmark's `/bench/*`, which only `cascade-bench` adds).
    pub fn router_with(&self, extra: ExtraRoutes) -> App {
        let server = ServerState {
            app: self.state.clone(),
            metrics: self.metrics.clone(),
            live: self.live.clone(),
            realtime: self.realtime.clone(),
        };
        crate::http::app(&server, &self.modules, extra)
    }

    /// Serves on `listener` until `shutdown` resolves, drains in-flight requests for at most
    /// `SHUTDOWN_TIMEOUT`, then stops the background tasks and the database.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.serve_with(listener, ExtraRoutes::default(), shutdown)
            .await
    }

    /// [`serve`](Self::serve) with `extra` routes (see [`router_with`](Self::router_with)).
    pub async fn serve_with(
        self,
        listener: TcpListener,
        extra: ExtraRoutes,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let http = self.state.config.http.clone();
        let router = self.router_with(extra);
        let served = crate::serve(listener, router, shutdown, &http).await;
        // Writes whose clients hung up may still be running: let them finish (and invalidate)
        // before the pool closes.
        self.state.detached.finish(http.shutdown_timeout).await;
        self.stop().await;
        Ok(served?)
    }

    /// Background tasks that panicked or ended before shutdown so far (each also logged).
    pub fn failed_tasks(&self) -> u64 {
        self.tasks.failures()
    }

    /// Stops the background tasks, closes the pool and stops the embedded PostgreSQL.
    pub async fn stop(self) {
        self.tasks.stop(Duration::from_secs(10)).await;
        self.state.cache.stop_bus();
        self.database.db.close();
        drop(self.database);
        tracing::info!("stopped");
    }
}

async fn connect_redis(config: &Config) -> anyhow::Result<Option<Redis>> {
    let Some(redis_config) = &config.redis else {
        tracing::info!("no REDIS_URL: running without Redis (in-process cache tier only)");
        return Ok(None);
    };
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
    Ok(Some(redis))
}

/// The platform's own upkeep: the pool's minimum, expired cache rows and sessions, metric
/// histograms; and the listener that brings other instances' domain events.
fn start_platform_tasks(state: &AppState, metrics: &Metrics, tasks: &mut Supervisor) {
    let events = state.events.clone();
    tasks.spawn("events", move |stop| events.run(stop));
    let db = state.db.clone();
    tasks.spawn("pool-maintenance", |stop| pool_maintenance(db, stop));
    if let Some(replicas) = state.db.replicas() {
        let (replicas, primary) = (replicas.clone(), state.db.clone());
        tasks.spawn("replica-health", move |stop| {
            replicas.run_health(primary, stop)
        });
    }
    // Redis and the in-process tier expire entries themselves; PostgreSQL's table needs a sweep.
    if state.config.cache.backend == CacheBackend::Postgres {
        let cache = state.cache.clone();
        let interval = state.config.cache.cleanup_interval;
        tasks.spawn("cache-cleanup", move |stop| {
            cache.run_cleanup(interval, stop)
        });
    }
    let identity = state.identity.clone();
    let interval = state.config.auth.session_cleanup_interval;
    tasks.spawn("session-cleanup", move |stop| {
        identity.run_cleanup(interval, stop)
    });
    let metrics = metrics.clone();
    tasks.spawn("metrics-upkeep", move |stop| {
        metrics.run_upkeep(Duration::from_secs(5), stop)
    });
}

/// Keeps `PG_POOL_MIN` connections open, so a restarted PostgreSQL gets its warm pool back.
async fn pool_maintenance(db: Db, mut stop: ShutdownSignal) {
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => db.top_up().await,
        }
    }
}
