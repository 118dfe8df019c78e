//! The application's part of the API document: its paths (the `#[utoipa::path]` attributes
//! on its handlers) and the schemas of their bodies.

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    paths(crate::citizens::citizen, crate::accounts::link, crate::accounts::unlink, crate::economics::quote_route, crate::investments::invest, crate::investments::mine, crate::investments::space_totals),
    tags(
        (name = "citizens", description = "Venice citizens (the ledger), cached; served stale within a bound while Venice fails."),
        (name = "economics", description = "The ducat/USD bridge: exact amounts as decimal strings, rounded half-even to the cent."),
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

/// Amounts in one currency, decimal strings with two decimals.
#[derive(ToSchema)]
pub struct Amounts {
    #[schema(example = "150.00")]
    pub gross: String,
    #[schema(example = "3.75")]
    pub fee: String,
    #[schema(example = "146.25")]
    pub net: String,
}

/// An investment, as recorded.
#[derive(ToSchema)]
pub struct Investment {
    pub id: i64,
    pub space_id: String,
    /// The currency the investor gave: `usd` or `ducats`.
    pub from: String,
    pub usd: Amounts,
    pub ducats: Amounts,
    /// USD per ducat at the time.
    pub rate: String,
    pub fee_percent: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// A page of the caller's investments.
#[derive(ToSchema)]
pub struct InvestmentPage {
    pub investments: Vec<Investment>,
    /// The `cursor` of the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// A space's investments, summed.
#[derive(ToSchema)]
pub struct SpaceInvestments {
    pub space_id: String,
    #[schema(minimum = 0)]
    pub investments: i64,
    pub usd: Amounts,
    pub ducats: Amounts,
}
