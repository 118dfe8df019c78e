//! The application's part of the API document: its paths (the `#[utoipa::path]` attributes
//! on its handlers) and the schemas of their bodies.

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    paths(crate::citizens::citizen),
    tags((name = "citizens", description = "Venice citizens (the ledger), cached; served stale within a bound while Venice fails."))
)]
pub struct AppApi;

/// A citizen's ledger as Venice gave it, and how fresh it is.
#[derive(ToSchema)]
pub struct Citizen {
    pub username: String,
    /// True when Venice could not be reached and this is the last good copy.
    pub stale: bool,
    /// Seconds since Venice gave this answer.
    #[schema(minimum = 0)]
    pub age: u64,
    /// When Venice gave it, milliseconds since the Unix epoch.
    #[schema(minimum = 0)]
    pub fetched_at_ms: u64,
    /// Venice's answer to `/get-ledger`, unchanged.
    pub ledger: JsonObject,
}
