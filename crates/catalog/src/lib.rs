//! The `catalog` module (seed 003): producers publish versioned assets; policies and receipts
//! make a version usable; OpenLineage run events say which versions derive from which.
//!
//! It owns the tables `producers`, `assets`, `policies`, `receipts`, `lineage_event_audit`,
//! `lineage_edges` and `lineage_pending_edges` ([`MIGRATIONS`], its own version space), the
//! cache namespaces of seed 003 ([`config`]), the routes below and their tests (`tests/`).
//!
//! - [`model`] and [`listing`]: request input parsed into types that cannot hold bad values;
//! - [`openlineage`]: the OpenLineage run event, validated, and the edges it implies;
//! - [`queries`]: the SQL, returning [`CatalogError`] (mapped to HTTP in one `From`);
//! - [`invalidation`]: cache keys, tags, and which entries each write removes;
//! - [`reads`] and [`writes`]: the HTTP handlers; [`http_cache`]: ETags and `Cache-Control`;
//! - [`search`]: what `GET /search` finds here (assets, public as `/listings` is);
//! - [`seed`]: a realistic generated catalog for benchmarks (`cascade seed catalog`).

pub mod config;
pub mod error;
pub mod http_cache;
pub mod invalidation;
pub mod listing;
pub mod model;
pub mod openapi;
pub mod openlineage;
pub mod queries;
pub mod reads;
pub mod search;
pub mod seed;
pub mod writes;

#[cfg(feature = "bench-routes")]
pub mod bench_routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::FromRef;
use axum::routing::{get, post};
use cascade_core::cache::Cache;
use cascade_core::db::{Db, Migration};
use cascade_http::{AppState, Module};

pub use config::{CatalogConfig, RawCatalogConfig};
pub use error::CatalogError;

/// The catalog's migrations. Append only: never edit one that has shipped. They were numbers 4
/// and 5 of the single list releases before module version spaces used, hence `legacy`.
pub const MIGRATIONS: &[Migration] = &[
    Migration::new(
        "catalog",
        1,
        "catalog",
        include_str!("../migrations/0001_catalog.sql"),
    )
    .legacy(4),
    Migration::new(
        "catalog",
        2,
        "catalog_owners",
        include_str!("../migrations/0002_catalog_owners.sql"),
    )
    .legacy(5),
    Migration::new(
        "catalog",
        3,
        "lineage_pending",
        include_str!("../migrations/0003_lineage_pending.sql"),
    ),
    Migration::new(
        "catalog",
        4,
        "search",
        include_str!("../migrations/0004_search.sql"),
    ),
];

/// What the catalog's handlers receive: the platform's pool and cache, and its own settings.
/// One `Arc`: extracting it costs a handler one reference count, not one per field.
#[derive(Clone)]
pub struct CatalogState(Arc<CatalogShared>);

impl std::ops::Deref for CatalogState {
    type Target = CatalogShared;

    fn deref(&self) -> &CatalogShared {
        &self.0
    }
}

pub struct CatalogShared {
    pub db: Db,
    pub cache: Cache,
    pub config: Arc<CatalogConfig>,
    /// For [`CurrentUser`](cascade_http::CurrentUser), which needs identity and rate limits.
    pub app: AppState,
}

impl FromRef<CatalogState> for AppState {
    fn from_ref(state: &CatalogState) -> AppState {
        state.app.clone()
    }
}

/// The module as the server composes it.
pub struct CatalogModule {
    pub config: Arc<CatalogConfig>,
}

impl CatalogModule {
    pub fn new(config: CatalogConfig) -> CatalogModule {
        CatalogModule {
            config: Arc::new(config),
        }
    }

    pub fn state(&self, app: &AppState) -> CatalogState {
        CatalogState(Arc::new(CatalogShared {
            db: app.db.clone(),
            cache: app.cache.clone(),
            config: self.config.clone(),
            app: app.clone(),
        }))
    }
}

impl Module for CatalogModule {
    fn name(&self) -> &'static str {
        "catalog"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        <openapi::CatalogApi as utoipa::OpenApi>::openapi()
    }

    /// The hot read, `GET /listings/{version_id}`: past the router (issue 13).
    fn fast_routes(&self, state: &AppState) -> Vec<cascade_http::FastRoute> {
        vec![reads::asset_fast(self.state(state))]
    }

    fn search_providers(&self) -> Vec<Arc<dyn cascade_http::SearchProvider>> {
        vec![Arc::new(search::AssetSearch)]
    }

    fn router(&self, state: &AppState) -> Router {
        let routes = Router::new()
            .route("/producers", post(writes::create_producer))
            .route("/assets", post(writes::create_asset))
            .route("/policies", post(writes::create_policy))
            .route("/receipts", post(writes::create_receipt))
            .route(
                "/lineage",
                post(writes::record_lineage).delete(writes::remove_lineage),
            )
            .route("/listings", get(reads::listings))
            .route(
                reads::ASSET_PATH,
                get(reads::asset)
                    .patch(writes::update_asset)
                    .delete(writes::delete_asset),
            )
            .route("/bundle", get(reads::bundle))
            .route("/ready", get(reads::ready));
        routes.with_state(self.state(state))
    }
}
