//! The HTTP surface: composes the module routers and wraps them in the shared middleware.
//! Each module hands over its router with its state applied ([`Module::router`]); the
//! server's own routes (health, metrics, dashboard, identity, `/openapi.json`, `/docs`) are
//! added here. Nothing here
//! imports a module: the [`Application`](crate::Application) passes them in.

mod dashboard;
mod docs;
mod edge;
mod health;
pub mod live;
pub mod metrics;
pub mod middleware;
pub mod openapi;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use cascade_http::Module;
use tower::Layer;

use crate::state::ServerState;

pub use edge::App;

/// The whole application, the router behind the edge, ready for [`serve`](crate::serve) or
/// for `oneshot` in tests. `extra` routes (with their path templates, `extra_paths`, which
/// label their metrics) go behind the same middleware: only `cascade-bench` passes any (its
/// `/bench/*` routes), so the product's router never has them, whatever cargo features a
/// workspace build merges.
pub fn app(
    state: &ServerState,
    modules: &[Arc<dyn Module>],
    extra: Router,
    extra_paths: &[&str],
) -> App {
    let http = &state.app.config.http;
    let request_timeout: Duration = http.request_timeout;
    let body_limit = http.body_limit_bytes;
    let document = openapi::document(modules);
    let mut router = Router::new()
        .merge(health::router().with_state(state.app.clone()))
        .merge(metrics::router().with_state(state.clone()))
        .merge(dashboard::router())
        .merge(crate::auth::router().with_state(state.app.clone()))
        .merge(openapi::router(&document))
        .merge(docs::router())
        .merge(extra);
    for module in modules {
        router = router.merge(module.router(&state.app));
    }
    // One layer around the whole router (edge.rs): request id, span, metrics, JSON errors,
    // rate-limit headers, compression for clients that ask, the request deadline (504) and
    // the body limit (413). Its route labels are the documented paths (the OpenAPI test keeps
    // them equal to the router's) and the extra routes'.
    let templates = document.paths.paths.keys().map(String::as_str);
    let routes = edge::RouteTable::new(templates.chain(extra_paths.iter().copied()));
    edge::EdgeLayer::new(request_timeout, body_limit, routes).layer(router)
}
