//! The application's part of the API document: its paths (the `#[utoipa::path]` attributes
//! on its handlers) and the schemas of their bodies.

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::citizens::citizen,
        crate::accounts::link,
        crate::accounts::unlink,
        crate::interactions::mine
    ),
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

/// An account's link to a Venice citizen.
#[derive(ToSchema)]
pub struct CitizenLink {
    pub venice_username: String,
    /// When the account was linked to this citizen (RFC 3339, UTC).
    pub linked_at: String,
}

/// One entry of the interaction log.
#[derive(ToSchema)]
pub struct Interaction {
    pub id: String,
    /// `citizen_link`, `citizen_unlink` or `pattern_view`.
    pub r#type: String,
    /// What the interaction concerned, e.g. `{"venice_username": "Italia"}`.
    pub data: JsonObject,
    /// When it happened (RFC 3339, UTC, microseconds).
    pub created_at: String,
}

/// A page of `GET /me/interactions`, newest first.
#[derive(ToSchema)]
pub struct InteractionPage {
    pub items: Vec<Interaction>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}
