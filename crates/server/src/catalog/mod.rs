//! The `catalog` module (seed 003): producers publish versioned assets; policies and receipts
//! make a version usable; OpenLineage run events say which versions derive from which.
//!
//! - [`model`]: request bodies parsed into types that cannot hold bad values;
//! - [`openlineage`]: the OpenLineage run event, validated, and the edges it implies;
//! - [`queries`]: the SQL (tables in `crates/core/migrations/0004_catalog.sql`);
//! - [`invalidation`]: cache keys, tags, and which entries each write removes;
//! - [`reads`] and [`writes`]: the HTTP handlers; [`http_cache`]: ETags and `Cache-Control`;
//! - [`seed`]: a realistic generated catalog for benchmarks (`cascade seed catalog`).

pub mod http_cache;
pub mod invalidation;
pub mod model;
pub mod openlineage;
pub mod queries;
pub mod reads;
pub mod seed;
pub mod writes;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/producers", post(writes::create_producer))
        .route("/assets", post(writes::create_asset))
        .route("/policies", post(writes::create_policy))
        .route("/receipts", post(writes::create_receipt))
        .route("/lineage", post(writes::record_lineage))
        .route("/listings", get(reads::listings))
        .route(
            "/listings/{version_id}",
            get(reads::asset)
                .patch(writes::update_asset)
                .delete(writes::delete_asset),
        )
        .route("/bundle", get(reads::bundle))
        .route("/ready", get(reads::ready))
}
