//! Routes for `cascade bench`, served only with `BENCH_ROUTES=true`: the baseline (a fixed
//! body through the same stack) and the catalog's reads straight to PostgreSQL, without the
//! cache, to measure what the cache is worth on the same server in the same run.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::catalog::http_cache::{self, respond};
use crate::catalog::queries;
use crate::http::ApiError;
use crate::state::AppState;

/// Bodies above this are refused: the route exists to mirror an API answer, not to stream.
const FIXED_MAX: usize = 1 << 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/bench/fixed/{bytes}", get(fixed))
        .route("/bench/pg/listings/{version}", get(pg_asset))
        .route("/bench/pg/bundle", get(pg_bundle))
}

/// `bytes` bytes of JSON (a string of `x`), as a handler that does no work would return.
async fn fixed(Path(bytes): Path<usize>) -> Result<impl IntoResponse, ApiError> {
    if !(2..=FIXED_MAX).contains(&bytes) {
        return Err(ApiError::bad_request(
            "bytes",
            "must be between 2 and 1048576",
        ));
    }
    let mut body = Vec::with_capacity(bytes);
    body.push(b'"');
    body.resize(bytes - 1, b'x');
    body.push(b'"');
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}

/// `GET /listings/{version}` without the cache: the same statement, the same ETag work.
async fn pg_asset(
    State(state): State<AppState>,
    Path(version): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let body = queries::asset(&state.db.conn().await?, &version)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no asset {version}")))?;
    Ok(respond(&headers, &body, http_cache::ASSET))
}

#[derive(Deserialize)]
struct BundleParams {
    #[serde(rename = "versionId")]
    version: String,
    depth: i32,
}

/// `GET /bundle` without the cache.
async fn pg_bundle(
    State(state): State<AppState>,
    Query(params): Query<BundleParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let depth = params.depth.clamp(0, 10);
    let body = queries::bundle(&state.db.conn().await?, &params.version, depth)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no asset {}", params.version)))?;
    Ok(respond(&headers, &body, http_cache::REVALIDATE))
}
