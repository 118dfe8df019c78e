//! The HTTP surface: composes the module routers and wraps them in the shared middleware.
//! Each module hands over its router with its state applied ([`Module::router`]); the
//! server's own routes (health, metrics, dashboard, identity) are added here. Nothing here
//! imports a module: the [`Application`](crate::Application) passes them in.

#[cfg(feature = "bench-routes")]
mod bench;
mod dashboard;
mod health;
pub mod metrics;
pub mod middleware;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use cascade_http::Module;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::state::ServerState;

/// The whole application as a `Router`, ready for `axum::serve` or for `oneshot` in tests.
pub fn app(state: &ServerState, modules: &[Arc<dyn Module>]) -> Router {
    let http = &state.app.config.http;
    let request_timeout: Duration = http.request_timeout;
    let body_limit = http.body_limit_bytes;
    let mut router = Router::new()
        .merge(health::router().with_state(state.app.clone()))
        .merge(metrics::router().with_state(state.clone()))
        .merge(dashboard::router())
        .merge(crate::auth::router().with_state(state.app.clone()));
    #[cfg(feature = "bench-routes")]
    {
        router = router.merge(bench::router());
    }
    for module in modules {
        router = router.merge(module.router(&state.app));
    }
    router.layer(
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
            .layer(axum::middleware::from_fn(
                cascade_http::auth::rate_limit_headers,
            )),
    )
}
