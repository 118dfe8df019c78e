//! The CASCADE application (seeds 000, 001, 004): users linked to Venice citizens,
//! consciousness sessions and patterns, collaboration spaces, the ducat/USD bridge, Stripe
//! billing, real-time channels.
//!
//! - [`config`]: its settings and cache namespaces, registered with the platform so that
//!   `cascade --help`, `cascade config` and `CACHE_TTLS_JSON` know them;
//! - [`venice`]: Venice through the core's cached connector (pool, retries, breaker,
//!   stale-if-error), the username type, the cache keys; the startup probe;
//! - [`citizens`]: `GET /citizens/{username}`; [`openapi`]: its part of the API document;
//! - [`accounts`]: `POST /me/citizen` and `DELETE /me/citizen`, an account's link to a Venice
//!   citizen, and its columns of `cascade_users` ([`MIGRATIONS`], its own version space).
//!
//! Its other tables, routes and tasks arrive with the issues that build them.

pub mod accounts;
pub mod citizens;
pub mod config;
pub mod economics;
pub mod investments;
pub mod openapi;
pub mod venice;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::FromRef;
use axum::routing::{get, post};
use cascade_core::db::Migration;
use cascade_core::tasks::Supervisor;
use cascade_core::upstream::Connector;
use cascade_http::{AppState, Module};

pub use config::{AppConfig, RawAppConfig};

/// The application's migrations. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration::new(
        "app",
        1,
        "citizen_link",
        include_str!("../migrations/0001_citizen_link.sql"),
    ),
    Migration::new(
        "app",
        5,
        "investments",
        include_str!("../migrations/0005_investments.sql"),
    ),
];

/// The module as the server composes it.
pub struct AppModule {
    pub config: AppConfig,
}

/// What the application's handlers receive. One `Arc`: extracting it costs a reference count.
#[derive(Clone)]
pub struct AppModuleState(Arc<AppShared>);

impl std::ops::Deref for AppModuleState {
    type Target = AppShared;

    fn deref(&self) -> &AppShared {
        &self.0
    }
}

pub struct AppShared {
    pub config: AppConfig,
    /// Venice: one pool, one breaker for this instance.
    pub venice: Connector,
    /// For [`CurrentUser`](cascade_http::CurrentUser): identity and rate limits.
    pub app: AppState,
}

impl FromRef<AppModuleState> for AppState {
    fn from_ref(state: &AppModuleState) -> AppState {
        state.app.clone()
    }
}

impl Module for AppModule {
    fn name(&self) -> &'static str {
        "app"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        <openapi::AppApi as utoipa::OpenApi>::openapi()
    }

    fn router(&self, state: &AppState) -> Router {
        // Building a client fails only when TLS cannot be set up: a startup error.
        let venice = venice::connector(&self.config, state.cache.clone())
            .expect("the Venice HTTP client (TLS setup)");
        let state = AppModuleState(Arc::new(AppShared {
            config: self.config.clone(),
            venice,
            app: state.clone(),
        }));
        // Account data: never stored by a browser or a shared cache (as the other `/me` routes).
        let account = Router::new()
            .route("/me/citizen", post(accounts::link).delete(accounts::unlink))
            .route(
                "/investments",
                post(investments::invest).get(investments::mine),
            )
            .layer(axum::middleware::map_response(no_store));
        Router::new()
            .route("/citizens/{username}", get(citizens::citizen))
            .route("/economics/quote", get(economics::quote_route))
            .route("/spaces/{space_id}/investments", get(investments::space_totals))
            .merge(account)
            .with_state(state)
    }

    fn start_tasks(&self, state: &AppState, tasks: &mut Supervisor) {
        let config = self.config.clone();
        tasks.spawn("venice-startup-probe", |mut stop| async move {
            // Logged whatever the answer; startup does not wait for it.
            tokio::select! {
                () = venice::startup_probe(config) => {}
                () = stop.recv() => return,
            }
            stop.recv().await;
        });
        let db = state.db.clone();
        tasks.spawn("idempotency-key-pruning", move |stop| {
            investments::prune_keys(db, stop)
        });
    }
}

async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// `GET {VENICE_API_URL}/health` under `deadline`: `Ok` with what answered, `Err` with why
/// not (`cascade check` and the startup probe).
pub async fn probe_venice(config: &AppConfig, deadline: Duration) -> Result<String, String> {
    let client = cascade_core::upstream::http_client(deadline, deadline)
        .map_err(|err| cascade_core::db::error_chain(&err))?;
    let url = &format!("{}/health", config.venice.url);
    let started = Instant::now();
    let mut request = client.get(url);
    if let Some(key) = &config.venice.api_key {
        request = request.bearer_auth(key.expose());
    }
    match cascade_core::upstream::send("venice", request).await {
        Ok(response) => Ok(format!(
            "{url} answered HTTP {} in {} ms",
            response.status().as_u16(),
            started.elapsed().as_millis()
        )),
        Err(err) => Err(format!("{url}: {}", cascade_core::db::error_chain(&err))),
    }
}

#[cfg(test)]
mod tests {
    use cascade_core::db::{CORE_MIGRATIONS, check_migrations};

    #[test]
    fn the_migrations_form_their_own_version_space_after_the_core() {
        check_migrations(&[CORE_MIGRATIONS, super::MIGRATIONS]).expect("consistent");
        assert!(super::MIGRATIONS.iter().all(|m| m.module == "app"));
    }
}
