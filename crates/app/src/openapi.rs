//! The application's part of the API document: its paths (the `#[utoipa::path]` attributes
//! on its handlers) and the schemas of their bodies.

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use utoipa::{IntoParams, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::citizens::citizen,
        crate::accounts::link,
        crate::accounts::unlink,
        crate::economics::quote_route,
        crate::patterns::pattern,
        crate::patterns::list
    ),
    tags(
        (name = "citizens", description = "Venice citizens (the ledger), cached; served stale within a bound while Venice fails."),
        (name = "economics", description = "The ducat/USD bridge: exact amounts as decimal strings, rounded half-even to the cent."),
        (name = "patterns", description = "Consciousness patterns computed from Venice's lists (counts and an emergence score), stored until they expire and refreshed in the background.")
    )
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

/// An account's link to a Venice citizen.
#[derive(ToSchema)]
pub struct CitizenLink {
    pub venice_username: String,
    /// When the account was linked to this citizen (RFC 3339, UTC).
    pub linked_at: String,
}

/// `GET /patterns` parameters.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Query)]
pub struct PatternListParams {
    /// Only this pattern type.
    #[param(
        rename = "type",
        pattern = "^(collective_activity|economic_consciousness|social_consciousness)$"
    )]
    pattern_type: Option<String>,
    /// Patterns per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `nextCursor` of the previous page.
    #[param(pattern = "^(collective_activity|economic_consciousness|social_consciousness)$")]
    cursor: Option<String>,
}
