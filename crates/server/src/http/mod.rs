//! The HTTP surface: composes the module routers and wraps them in the shared middleware.
//! Feature modules expose `fn router() -> Router<AppState>`; this file only composes them.

mod dashboard;
pub mod error;
pub mod extract;
mod health;
pub mod metrics;
pub mod middleware;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::state::AppState;

/// The whole application as a `Router`, ready for `axum::serve` or for `oneshot` in tests.
pub fn app(state: AppState) -> Router {
    let http = &state.config.http;
    let request_timeout: Duration = http.request_timeout;
    let body_limit = http.body_limit_bytes;
    let bench = if state.config.bench_routes {
        crate::bench::router()
    } else {
        Router::new()
    };
    Router::new()
        .merge(bench)
        .merge(health::router())
        .merge(metrics::router())
        .merge(dashboard::router())
        .merge(crate::auth::router())
        .merge(crate::cascade::router())
        .merge(crate::agents::router())
        .merge(crate::catalog::router())
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(
                    middleware::REQUEST_ID,
                    MakeRequestUuid,
                ))
                .layer(axum::middleware::from_fn(metrics::record_request))
                .layer(TraceLayer::new_for_http().make_span_with(middleware::request_span))
                .layer(PropagateRequestIdLayer::new(middleware::REQUEST_ID))
                .layer(axum::middleware::map_response(middleware::json_errors))
                .layer(CatchPanicLayer::new())
                .layer(CompressionLayer::new())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::GATEWAY_TIMEOUT,
                    request_timeout,
                ))
                .layer(DefaultBodyLimit::max(body_limit))
                .layer(axum::middleware::from_fn(crate::auth::rate_limit_headers)),
        )
        .with_state(state)
}
