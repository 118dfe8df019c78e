//! `/bench/pg/*` (compiled with the cargo feature `bench-routes`, which only `cascade-bench`
//! enables, and mounted only by `cascade-bench serve`, never by the catalog's own router): the
//! catalog's reads straight to PostgreSQL, without the cache, so the benchmark measures what
//! the cache is worth on the same server in the same run.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use cascade_http::ApiError;
use serde::Deserialize;

use crate::CatalogState;
use crate::http_cache::{self, IfNoneMatch, respond_uncached};
use crate::queries;

/// The routes' path templates.
pub const LISTINGS: &str = "/bench/pg/listings/{version}";
pub const BUNDLE: &str = "/bench/pg/bundle";

pub fn router() -> Router<CatalogState> {
    Router::new()
        .route(LISTINGS, get(pg_asset))
        .route(BUNDLE, get(pg_bundle))
}

/// `GET /listings/{version}` without the cache: the same statement, the same ETag work.
async fn pg_asset(
    State(state): State<CatalogState>,
    Path(version): Path<String>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let body = queries::asset(&state.db.conn().await?, &version)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no asset {version}")))?;
    Ok(respond_uncached(&if_none_match, body, http_cache::ASSET))
}

#[derive(Deserialize)]
struct BundleParams {
    #[serde(rename = "versionId")]
    version: String,
    depth: i32,
}

/// `GET /bundle` without the cache.
async fn pg_bundle(
    State(state): State<CatalogState>,
    Query(params): Query<BundleParams>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let depth = params.depth.clamp(0, 10);
    let body = queries::bundle(&state.db.conn().await?, &params.version, depth)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no asset {}", params.version)))?;
    Ok(respond_uncached(
        &if_none_match,
        body,
        http_cache::REVALIDATE,
    ))
}
