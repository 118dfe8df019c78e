//! What an application module hands the server.
//!
//! A module (the catalog, the CASCADE application, agents) owns its tables, cache namespaces,
//! configuration, routes and background tasks. Its configuration and cache namespaces are
//! registered before anything connects (they are part of parsing the configuration, so that
//! `cascade --help` lists every setting and `CACHE_TTLS_JSON` knows every namespace); what
//! needs a connection is registered through this trait once the platform is up.

use std::sync::Arc;

use axum::Router;
use cascade_core::db::Migration;
use cascade_core::tasks::Supervisor;

use crate::channels::ChannelAuthorizer;
use crate::fast::FastRoute;
use crate::search::SearchProvider;
use crate::state::AppState;

pub trait Module: Send + Sync + 'static {
    /// The module's name: its migrations' version space, and a log field.
    fn name(&self) -> &'static str;

    /// The module's migrations, in order, numbered in its own version space.
    fn migrations(&self) -> &'static [Migration] {
        &[]
    }

    /// The module's routes, with its own state applied.
    fn router(&self, state: &AppState) -> Router;

    /// Routes of [`Module::router`] the edge serves past the router, for their `GET`s (see
    /// [`FastRoute`]): the hottest reads only. Each must answer as its router route does.
    fn fast_routes(&self, _state: &AppState) -> Vec<FastRoute> {
        Vec::new()
    }

    /// The module's part of the OpenAPI document: every route of [`Module::router`], with
    /// its schemas (usually `#[derive(utoipa::OpenApi)]` over its `#[utoipa::path]` handlers).
    /// The server merges the parts; its route test fails on a route this leaves out.
    fn openapi(&self) -> utoipa::openapi::OpenApi {
        utoipa::openapi::OpenApi::default()
    }

    /// Starts the module's background tasks under `tasks`, which stops them on shutdown.
    fn start_tasks(&self, _state: &AppState, _tasks: &mut Supervisor) {}

    /// The real-time channel families this module decides access to, by family name (`space`
    /// for `space:{id}`): see [`ChannelAuthorizer`].
    fn channel_authorizers(&self) -> Vec<(&'static str, Arc<dyn ChannelAuthorizer>)> {
        Vec::new()
    }

    /// The types this module lets `GET /search` find, one provider each: see
    /// [`SearchProvider`].
    fn search_providers(&self) -> Vec<Arc<dyn SearchProvider>> {
        Vec::new()
    }
}
