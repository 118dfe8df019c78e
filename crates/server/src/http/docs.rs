//! `GET /docs`: the API reference, one self-contained page (inline CSS and script, nothing
//! loaded from elsewhere, so it works offline and behind any firewall) that fetches
//! `/openapi.json` and lists every operation with its parameters, bodies and responses.
//! Swagger UI, Redoc and Scalar all load their script from a CDN or download it at build time.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const PAGE: &str = include_str!("docs.html");

/// The inline script and style may run, and fetch from this origin only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'";

pub fn router() -> Router {
    Router::new().route("/docs", get(docs))
}

/// This reference, as a page.
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "A self-contained page that renders `/openapi.json`", content_type = "text/html", body = String))
)]
pub(super) async fn docs() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
