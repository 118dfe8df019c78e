//! The HTTP surface: composes the module routers and wraps them in the shared middleware.
//! Each module hands over its router with its state applied ([`Module::router`]); the
//! server's own routes (health, metrics, dashboard and its statements, identity,
//! `/openapi.json`, `/docs`, and `/search` over every module's search providers) are
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
mod search;
mod statements;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use cascade_http::{FastRoute, Module, SearchProvider};
use tower::Layer;

use crate::state::ServerState;

pub use edge::App;

/// Every module's search providers, in module order (`GET /search`'s `types`).
pub fn search_providers(modules: &[Arc<dyn Module>]) -> Vec<Arc<dyn SearchProvider>> {
    modules.iter().flat_map(|m| m.search_providers()).collect()
}

/// Routes beside the modules', behind the same middleware: only `cascade-bench` passes any
/// (its `/bench/*` routes), so the product's router never has them, whatever cargo features a
/// workspace build merges.
#[derive(Default)]
pub struct ExtraRoutes {
    pub router: Router,
    /// The router's path templates, which label their metrics.
    pub templates: Vec<&'static str>,
    /// Those of its `GET` routes the edge serves past the router (see [`FastRoute`]).
    pub fast: Vec<FastRoute>,
}

/// The whole application, the router behind the edge, ready for [`serve`](crate::serve) or
/// for `oneshot` in tests, with the `extra` routes.
pub fn app(state: &ServerState, modules: &[Arc<dyn Module>], extra: ExtraRoutes) -> App {
    let http = &state.app.config.http;
    let request_timeout: Duration = http.request_timeout;
    let body_limit = http.body_limit_bytes;
    let document = openapi::document(modules);
    let mut router = Router::new()
        .merge(health::router().with_state(state.app.clone()))
        .merge(metrics::router().with_state(state.clone()))
        .merge(dashboard::router())
        .merge(statements::router().with_state(state.app.clone()))
        .merge(crate::auth::router().with_state(state.app.clone()))
        .merge(openapi::router(&document))
        .merge(docs::router())
        .merge(search::router(state.app.clone(), search_providers(modules)))
        .merge(extra.router);
    let mut fast = extra.fast;
    for module in modules {
        router = router.merge(module.router(&state.app));
        fast.extend(module.fast_routes(&state.app));
    }
    // One layer around the whole router (edge.rs): request id, span, metrics, JSON errors,
    // rate-limit headers, compression for clients that ask, the request deadline (504) and
    // the body limit (413). Its route labels are the documented paths (the OpenAPI test keeps
    // them equal to the router's) and the extra routes'; it serves the fast routes' `GET`s
    // itself.
    let templates = document.paths.paths.keys().map(String::as_str);
    let templates = templates.chain(extra.templates.iter().copied());
    let routes = edge::RouteTable::new(templates, fast);
    edge::EdgeLayer::new(request_timeout, body_limit, routes).layer(router)
}
