//! The `agents` module (seed 002): teams' AI agents, workflows and their executions, and the
//! audit trail of every change.
//!
//! It owns the tables `agents`, `workflows`, `executions` ([`MIGRATIONS`], version space
//! `agents`), the cache namespaces `agents`, `agent_lists`, `agent_search` and `workflow_search` ([`config`]), the routes
//! `/agents…`, `/workflows…`, `/executions…` and `/audit`, the execution workers, and their
//! tests (`tests/api`). The audit log itself is a core facility (`cascade_core::audit`).
//!
//! - [`model`]: request input parsed into values that cannot be wrong (fields named);
//! - [`queries`]: the agents' SQL, each write with its audit rows in the caller's transaction;
//! - [`routes`]: the agents' handlers, the cache keys and what each write removes; `/audit`;
//! - [`memory`]: memory snapshots per agent (append-only, latest first, bounded);
//! - [`workflows`]: workflows and executions over HTTP; [`queue`]: the queue's SQL (enqueue
//!   in a caller's transaction, claim, heartbeat, complete, rescue, prune);
//!   [`worker`]: the workers, the maintenance task and the LISTEN wake-ups;
//!   [`executor`]: the pluggable step executors (`echo`, `noop`, `http`);
//! - [`search`]: what `GET /search` finds here (the caller's agents and workflows);
//! - [`openapi`]: its part of the API document.

pub mod config;
pub mod error;
pub mod executor;
pub mod memory;
pub mod model;
pub mod openapi;
pub mod queries;
pub mod queue;
pub mod routes;
pub mod search;
pub mod worker;
pub mod workflows;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::FromRef;
use axum::routing::{get, post};
use cascade_core::cache::{Cache, Invalidations};
use cascade_core::db::{Db, Migration};
use cascade_core::tasks::Supervisor;
use cascade_core::upstream::{Connector, UpstreamSettings};
use cascade_http::{ApiError, AppState, Module};
use tokio::sync::Notify;

use crate::executor::Executors;

pub use config::{AgentsConfig, RawAgentsConfig};
pub use error::AgentError;

/// The module's migrations. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration::new(
        "agents",
        1,
        "agents",
        include_str!("../migrations/0001_agents.sql"),
    ),
    Migration::new(
        "agents",
        2,
        "workflows",
        include_str!("../migrations/0002_workflows.sql"),
    ),
    Migration::new(
        "agents",
        3,
        "agent_memories",
        include_str!("../migrations/0003_agent_memories.sql"),
    ),
    Migration::new(
        "agents",
        4,
        "search",
        include_str!("../migrations/0004_search.sql"),
    ),
];

/// What the handlers receive. One `Arc`: extracting it costs a reference count.
#[derive(Clone)]
pub struct AgentsState(Arc<AgentsShared>);

impl std::ops::Deref for AgentsState {
    type Target = AgentsShared;

    fn deref(&self) -> &AgentsShared {
        &self.0
    }
}

pub struct AgentsShared {
    pub config: AgentsConfig,
    /// What runs each step capability.
    pub executors: Executors,
    /// The platform: pool, cache, identity (for [`CurrentUser`](cascade_http::CurrentUser)).
    pub app: AppState,
}

impl FromRef<AgentsState> for AppState {
    fn from_ref(state: &AgentsState) -> AppState {
        state.app.clone()
    }
}

/// The module as the server composes it.
pub struct AgentsModule {
    pub config: AgentsConfig,
    /// Built once, for the router and the workers alike (one `http` connector, one breaker).
    state: OnceLock<AgentsState>,
    /// Executors added by the composing code, before the state is built.
    extra: Vec<(String, Arc<dyn executor::Executor>)>,
}

impl AgentsModule {
    pub fn new(config: AgentsConfig) -> AgentsModule {
        AgentsModule {
            config,
            state: OnceLock::new(),
            extra: Vec::new(),
        }
    }

    /// Adds the executor of `capability` (a custom step type) to the built-in ones.
    pub fn with_executor(
        mut self,
        capability: &str,
        executor: Arc<dyn executor::Executor>,
    ) -> Self {
        self.extra.push((capability.to_string(), executor));
        self
    }

    /// The executors of this configuration: the built-in ones (`http` on a connector whose
    /// namespaces live in `cache`, when `AGENTS_HTTP_URL` is set) and the added ones.
    pub fn executors(&self, cache: &Cache) -> Executors {
        let http = self.config.executions.http_url.as_ref().map(|url| {
            let settings = UpstreamSettings {
                name: "agents_http",
                base_url: url.clone(),
                api_key: None,
                connect_timeout: std::time::Duration::from_secs(2),
                request_timeout: self.config.executions.step_timeout,
                pool_size: 32,
                retries: 2,
                breaker_threshold: 5,
                breaker_cool_down: std::time::Duration::from_secs(5),
                namespace: config::HTTP_EXECUTOR,
                last_good_namespace: config::HTTP_EXECUTOR_LAST_GOOD,
                stale_if_error: std::time::Duration::from_secs(1),
            };
            // Building a client fails only when TLS cannot be set up: a startup error.
            Connector::new(settings, cache.clone()).expect("the HTTP executor's client (TLS setup)")
        });
        let mut executors = Executors::builtin(http);
        for (capability, executor) in &self.extra {
            executors.register(capability, executor.clone());
        }
        executors
    }

    /// The module's state on `app` (built on first use).
    pub fn state(&self, app: &AppState) -> AgentsState {
        self.state
            .get_or_init(|| {
                AgentsState(Arc::new(AgentsShared {
                    config: self.config.clone(),
                    executors: self.executors(&app.cache),
                    app: app.clone(),
                }))
            })
            .clone()
    }

    /// Starts the execution machinery under `tasks`: the rescue and prune task, and (unless
    /// `AGENTS_WORKERS` is 0) the listener and the workers. What `cascade serve` runs beside
    /// the API, and `cascade worker` alone.
    pub fn start_workers(&self, db: &Db, executors: Executors, tasks: &mut Supervisor) {
        worker::describe_metrics();
        let config = self.config.executions.clone();
        let (maintenance_db, maintenance) = (db.clone(), config.clone());
        tasks.spawn("executions-maintenance", move |stop| {
            worker::maintain(maintenance_db, maintenance, stop)
        });
        if config.workers == 0 {
            return;
        }
        let workers = worker::Workers {
            db: db.clone(),
            config: config.clone(),
            capabilities: executors.capabilities().into(),
            executors,
            wake: Arc::new(Notify::new()),
        };
        if config.listen {
            let (db, wake) = (db.clone(), workers.wake.clone());
            tasks.spawn("executions-listener", move |stop| {
                worker::listen(db, wake, stop)
            });
        }
        let instance = uuid::Uuid::new_v4().simple().to_string();
        for n in 0..config.workers {
            let (workers, name) = (workers.clone(), worker::worker_name(&instance[..12], n));
            tasks.spawn("executions-worker", move |stop| workers.run(name, stop));
        }
    }
}

impl Module for AgentsModule {
    fn name(&self) -> &'static str {
        "agents"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        <openapi::AgentsApi as utoipa::OpenApi>::openapi()
    }

    fn search_providers(&self) -> Vec<Arc<dyn cascade_http::SearchProvider>> {
        search::OwnedSearch::providers()
    }

    fn start_tasks(&self, app: &AppState, tasks: &mut Supervisor) {
        let executors = self.state(app).executors.clone();
        self.start_workers(&app.db, executors, tasks);
    }

    fn router(&self, state: &AppState) -> Router {
        let state = self.state(state);
        Router::new()
            .route("/agents", post(routes::create).get(routes::list))
            .route("/agents/bulk", post(routes::create_bulk))
            .route(
                "/agents/{id}",
                get(routes::get)
                    .patch(routes::update)
                    .delete(routes::delete),
            )
            .route(
                "/agents/{id}/memory",
                post(memory::append_route).get(memory::latest_route),
            )
            .route("/workflows", post(workflows::create))
            .route("/workflows/{id}", get(workflows::get))
            .route("/workflows/{id}/executions", post(workflows::enqueue))
            .route("/executions/{id}", get(workflows::execution))
            .route("/executions/{id}/cancel", post(workflows::cancel))
            .route("/audit", get(routes::audit))
            .route("/audit/all", get(routes::audit_all))
            // Account data: never stored by a browser or a shared cache.
            .layer(axum::middleware::map_response(no_store))
            .with_state(state)
    }
}

/// Runs `work` in a transaction of its own, commits it, then removes what `stale` says the
/// result made stale, before the caller answers (the next read on any instance sees the write).
///
/// It runs in the application's detached tasks: a client that hangs up mid-write does not cut
/// the invalidation short. The invalidation also runs when the commit fails (the connection
/// may have died after PostgreSQL committed): a needless reload costs less than a stale read.
pub(crate) async fn transaction<T, F, S>(
    state: &AgentsState,
    work: F,
    stale: S,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: for<'t> FnOnce(
            &'t tokio_postgres::Transaction<'t>,
        )
            -> std::pin::Pin<Box<dyn Future<Output = Result<T, AgentError>> + Send + 't>>
        + Send
        + 'static,
    S: FnOnce(&T) -> Invalidations + Send + 'static,
{
    let app = state.app.clone();
    let detached = app.detached.clone();
    let task = detached.run(async move {
        let mut conn = app.db.conn().await?;
        let tx = conn.transaction().await.map_err(AgentError::from)?;
        let done = work(&tx).await?;
        let committed = tx.commit().await;
        // The connection goes back to the pool before the invalidations, which wait for every
        // instance's acknowledgement.
        drop(conn);
        let stale = stale(&done);
        if !stale.is_empty() {
            app.cache.invalidate_batch(&stale).await;
        }
        committed.map_err(AgentError::from)?;
        Ok::<_, ApiError>(done)
    });
    task.await.map_err(|stopping| ApiError::Unavailable {
        message: stopping.to_string(),
        retry_after: std::time::Duration::from_secs(1),
    })?
}

async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_consistent_with_the_core() {
        use cascade_core::db::{CORE_MIGRATIONS, check_migrations};
        check_migrations(&[CORE_MIGRATIONS, super::MIGRATIONS]).expect("consistent");
    }
}
