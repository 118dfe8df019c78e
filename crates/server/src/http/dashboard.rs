//! `GET /dashboard`: one self-contained page (inline CSS and script, no external resources, so
//! it works offline) that polls `/metrics` and shows pool utilisation, cache hit rates,
//! operations per second, p50/p95/p99, table statistics and health, with seed 003's alert
//! thresholds highlighted. It is compiled into the binary.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const PAGE: &str = include_str!("dashboard.html");

/// The page may run its inline script and style and fetch from this origin only: a browser
/// enforces that it loads nothing from elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'";

pub fn router() -> Router {
    Router::new().route("/dashboard", get(dashboard))
}

#[utoipa::path(get, path = "/dashboard", tag = "operations",
    responses((status = 200, description = "A self-contained page that polls `/metrics`", content_type = "text/html", body = String))
)]
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
