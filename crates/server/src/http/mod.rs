//! The HTTP surface: composes the module routers and wraps them in the shared middleware.
//! Each module hands over its router with its state applied ([`Module::router`]); the
//! server's own routes (health, metrics, dashboard, identity, `/openapi.json`, `/docs`) are
//! added here. Nothing here
//! imports a module: the [`Application`](crate::Application) passes them in.

mod dashboard;
mod docs;
mod health;
pub mod metrics;
pub mod middleware;
pub mod openapi;

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
/// `extra` routes go behind the same middleware: only `cascade-bench` passes any (its
/// `/bench/*` routes), so the product's router never has them, whatever cargo features a
/// workspace build merges.
pub fn app(state: &ServerState, modules: &[Arc<dyn Module>], extra: Router) -> Router {
    let http = &state.app.config.http;
    let request_timeout: Duration = http.request_timeout;
    let body_limit = http.body_limit_bytes;
    let mut router = Router::new()
        .merge(health::router().with_state(state.app.clone()))
        .merge(metrics::router().with_state(state.clone()))
        .merge(dashboard::router())
        .merge(crate::auth::router().with_state(state.app.clone()))
        .merge(openapi::router(&openapi::document(modules)))
        .merge(docs::router())
        .merge(extra);
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
            // Outside `json_errors`: an error body rebuilt as JSON is compressed (and labelled)
            // by this one layer, never left with the label of a body it replaced.
            .layer(CompressionLayer::new())
            .layer(axum::middleware::map_response(middleware::json_errors))
            .layer(CatchPanicLayer::new())
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
