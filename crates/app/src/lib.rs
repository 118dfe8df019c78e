//! The CASCADE application (seeds 000, 001, 004): users linked to Venice citizens,
//! consciousness sessions and patterns, collaboration spaces, the ducat/USD bridge, Stripe
//! billing, real-time channels.
//!
//! - [`config`]: its settings and cache namespaces, registered with the platform so that
//!   `cascade --help`, `cascade config` and `CACHE_TTLS_JSON` know them;
//! - [`venice`]: Venice through the core's cached connector (pool, retries, breaker,
//!   stale-if-error), the username type, the cache keys; the startup probe;
//! - [`citizens`]: `GET /citizens/{username}`; [`openapi`]: its part of the API document;
//! - [`billing`]: Stripe: `POST /webhooks/stripe` (signed, exactly once, in any order) moves
//!   `cascade_subscriptions` and tiers; `GET /billing/subscription`; the reconciliation task
//!   that lists Stripe's recent events and applies the lost ones;
//! - [`accounts`]: `POST /me/citizen` and `DELETE /me/citizen`, an account's link to a Venice
//!   citizen, and its columns of `cascade_users` ([`MIGRATIONS`], its own version space);
//! - [`patterns`]: consciousness patterns computed from Venice's lists, `GET /patterns/{type}`
//!   and `GET /patterns`, table `consciousness_patterns`, and their background sync.
//! - [`spaces`]: collaboration spaces, consciousness sessions and the idle sweep;
//! - [`economics`]: exact ducat/USD quotes; [`investments`]: `POST /investments` (once per
//!   `Idempotency-Key`), the caller's list, a space's totals;
//! - [`tiers`]: which features need which subscription tier (one table).
//! - [`interactions`]: the interaction log (links, pattern views), recorded without waiting,
//!   written in batches by a background writer, deleted past its retention;
//!   `GET /me/interactions`.
//!
//! Its other tables, routes and tasks arrive with the issues that build them.

pub mod accounts;
pub mod billing;
pub mod citizens;
pub mod config;
pub mod economics;
pub mod interactions;
pub mod investments;
pub mod openapi;
pub mod patterns;
pub mod spaces;
pub mod tiers;
pub mod venice;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::FromRef;
use axum::routing::{get, patch, post};
use cascade_core::db::Migration;
use cascade_core::tasks::Supervisor;
use cascade_core::upstream::Connector;
use cascade_http::{AppState, Module};

pub use config::{AppConfig, RawAppConfig};
pub use interactions::{InteractionKind, Interactions};

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
        2,
        "patterns",
        include_str!("../migrations/0002_patterns.sql"),
    ),
    Migration::new(
        "app",
        3,
        "interactions",
        include_str!("../migrations/0003_interactions.sql"),
    ),
    Migration::new(
        "app",
        4,
        "spaces",
        include_str!("../migrations/0004_spaces.sql"),
    ),
    Migration::new(
        "app",
        5,
        "investments",
        include_str!("../migrations/0005_investments.sql"),
    ),
    Migration::new(
        "app",
        6,
        "billing",
        include_str!("../migrations/0006_billing.sql"),
    ),
    Migration::new(
        "app",
        7,
        "billing_reconcile",
        include_str!("../migrations/0007_billing_reconcile.sql"),
    ),
];

/// The module as the server composes it.
pub struct AppModule {
    pub config: AppConfig,
    /// Built once, for the router and the background tasks alike: one Venice connector, so
    /// one breaker, per instance (the sync must see the breaker requests trip).
    state: OnceLock<AppModuleState>,
    /// The interaction log's recorder, built with the module because two sides share it:
    /// the handlers ([`Module::router`]) record into it, the writer ([`Module::start_tasks`])
    /// drains it.
    pub interactions: Interactions,
}

impl AppModule {
    pub fn new(config: AppConfig) -> AppModule {
        let interactions = Interactions::new(&config.interactions);
        AppModule {
            config,
            interactions,
            state: OnceLock::new(),
        }
    }
    fn state(&self, app: &AppState) -> AppModuleState {
        self.state
            .get_or_init(|| {
                AppModuleState::with_interactions(&self.config, app, &self.interactions)
            })
            .clone()
    }
}

/// What the application's handlers receive. One `Arc`: extracting it costs a reference count.
#[derive(Clone)]
pub struct AppModuleState(Arc<AppShared>);

impl AppModuleState {
    /// The module's state on `app` without its router or background tasks: what a one-shot
    /// command (`cascade billing reconcile|replay`) needs to run billing's own code. Its
    /// interaction log is never drained (such a command records none).
    pub fn new(config: &AppConfig, app: &AppState) -> AppModuleState {
        AppModuleState::with_interactions(config, app, &Interactions::new(&config.interactions))
    }

    fn with_interactions(
        config: &AppConfig,
        app: &AppState,
        interactions: &Interactions,
    ) -> AppModuleState {
        // Building a client fails only when TLS cannot be set up: a startup error.
        let venice = venice::connector(config, app.cache.clone())
            .expect("the Venice HTTP client (TLS setup)");
        billing::describe_metrics();
        let stripe = billing::checkout::connector(&config.stripe, app.cache.clone())
            .expect("the Stripe HTTP client (TLS setup)");
        AppModuleState(Arc::new(AppShared {
            config: config.clone(),
            venice,
            stripe,
            app: app.clone(),
            interactions: interactions.clone(),
        }))
    }
}

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
    /// Stripe (billing's POSTs): one pool, one breaker for this instance.
    pub stripe: Connector,
    /// For [`CurrentUser`](cascade_http::CurrentUser): identity and rate limits.
    pub app: AppState,
    /// The interaction log: `state.interactions.record(user_id, kind, data)` never waits.
    pub interactions: Interactions,
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
        let state = self.state(state);
        // Account data: never stored by a browser or a shared cache (as the other `/me` routes).
        let account = Router::new()
            .route("/me/citizen", post(accounts::link).delete(accounts::unlink))
            .route("/me/interactions", get(interactions::mine))
            .route(
                "/investments",
                post(investments::invest).get(investments::mine),
            )
            .layer(axum::middleware::map_response(no_store));
        let billing = Router::new()
            .route("/billing/subscription", get(billing::subscription))
            .route("/billing/checkout", post(billing::checkout::checkout))
            .route("/billing/portal", post(billing::checkout::portal))
            .layer(axum::middleware::map_response(no_store));
        Router::new()
            .route("/citizens/{username}", get(citizens::citizen))
            .route("/webhooks/stripe", post(billing::webhook::stripe_webhook))
            .merge(billing)
            .route("/economics/quote", get(economics::quote_route))
            .route(
                "/spaces/{space_id}/investments",
                get(investments::space_totals),
            )
            .route("/patterns", get(patterns::list))
            .route("/patterns/{type}", get(patterns::pattern))
            .merge(account)
            .merge(spaces_router())
            .with_state(state)
    }

    fn channel_authorizers(
        &self,
    ) -> Vec<(
        &'static str,
        std::sync::Arc<dyn cascade_http::ChannelAuthorizer>,
    )> {
        vec![(
            "space",
            std::sync::Arc::new(spaces::channel::SpaceParticipants),
        )]
    }

    fn start_tasks(&self, state: &AppState, tasks: &mut Supervisor) {
        let shared = self.state(state);
        if let (Some(every), Some(_)) = (
            self.config.stripe.reconcile_interval,
            &self.config.stripe.api_key,
        ) {
            let billing = shared.clone();
            tasks.spawn("stripe-reconcile", move |stop| {
                billing::reconcile::run(billing, every, stop)
            });
        }
        tasks.spawn("patterns-sync", |stop| patterns::sync::run(shared, stop));
        cascade_core::metrics::register_interaction_zeroes();
        let log = &self.config.interactions;
        let (writer, db, every) = (
            self.interactions.clone(),
            state.db.clone(),
            log.flush_interval,
        );
        tasks.spawn("interactions-writer", move |stop| {
            writer.run_writer(db, every, stop)
        });
        if let Some(retention) = log.retention {
            let (db, every) = (state.db.clone(), log.sweep_interval);
            tasks.spawn("interactions-retention", move |stop| {
                interactions::run_retention(db, retention, every, stop)
            });
        }
        let config = self.config.clone();
        tasks.spawn("venice-startup-probe", |mut stop| async move {
            // Logged whatever the answer; startup does not wait for it.
            tokio::select! {
                () = venice::startup_probe(config) => {}
                () = stop.recv() => return,
            }
            stop.recv().await;
        });
        let app = state.clone();
        let idle = self.config.consciousness.session_idle;
        tasks.spawn("consciousness-idle-sweep", move |stop| {
            spaces::idle::run(app, idle, stop)
        });
        let db = state.db.clone();
        tasks.spawn("idempotency-key-pruning", move |stop| {
            investments::prune_keys(db, stop)
        });
    }
}

/// Spaces and consciousness sessions (`spaces/`).
fn spaces_router() -> Router<AppModuleState> {
    use spaces::{routes, sessions};
    let spaces = Router::new()
        .route("/spaces", post(routes::create).get(routes::list))
        .route("/spaces/{space_id}", get(routes::get))
        .route("/spaces/{space_id}/participants", get(routes::participants))
        .route("/spaces/{space_id}/join", post(routes::join))
        .route("/spaces/{space_id}/leave", post(routes::leave))
        .route("/spaces/{space_id}/close", post(routes::close));
    // A session's answers are its user's (the first carries its token): never stored.
    let sessions = Router::new()
        .route("/consciousness/sessions", post(sessions::start))
        .route(
            "/consciousness/sessions/{id}",
            patch(sessions::set_level).delete(sessions::end),
        )
        .route(
            "/consciousness/sessions/{id}/heartbeat",
            post(sessions::heartbeat),
        )
        .layer(axum::middleware::map_response(no_store));
    spaces.merge(sessions)
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
