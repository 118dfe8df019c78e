//! Routes the edge serves past axum's router: the hottest `GET` routes (issue 13).
//!
//! Through the router, a request pays for its routing (a second walk of the route tree, a
//! percent-decoded `Arc<str>` for the path parameter's value and one for its name, a `Vec`,
//! an extension box and its map) and two boxed futures, on top of the handler's own work.
//! The edge already walks the same templates to label its metrics; for a [`FastRoute`] it
//! calls the handler from that walk with the parameter as a `&str`, and the handler's future
//! is the only box.
//!
//! A fast route is also a route of the router, with the same handler behind it: the edge
//! sends the router every request it does not serve itself (`HEAD`, other methods, a path
//! with a `%` in it, a request with a body or credentials) and every one the handler hands
//! back (`None`: a parameter whose rejection is axum's to word). Whichever serves it, a
//! request gets the same answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::response::Response;

/// The answer of a fast route's handler, boxed once.
pub type FastFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// A fast route's handler: given the path parameter (as the router would decode it: the edge
/// passes only parameters without `%`) and the request's headers (as the client sent them),
/// the answer, or `None` for the router to answer instead. Called outside the future: it
/// should only copy what it needs and leave the work to the future, which runs where a
/// panic is caught and the request deadline applies.
pub type FastHandler = Arc<dyn Fn(&str, &HeaderMap) -> Option<FastFuture> + Send + Sync>;

/// A `GET` route with one path parameter, served past the router (see the module's doc).
#[derive(Clone)]
pub struct FastRoute {
    /// The route's template, exactly as the router has it (`/listings/{version_id}`).
    pub template: &'static str,
    pub handler: FastHandler,
}

impl FastRoute {
    pub fn new(
        template: &'static str,
        handler: impl Fn(&str, &HeaderMap) -> Option<FastFuture> + Send + Sync + 'static,
    ) -> FastRoute {
        FastRoute {
            template,
            handler: Arc::new(handler),
        }
    }
}

impl std::fmt::Debug for FastRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastRoute")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}
