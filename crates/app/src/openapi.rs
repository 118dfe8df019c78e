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
        crate::interactions::mine,
        crate::economics::quote_route,
        crate::investments::invest,
        crate::investments::mine,
        crate::investments::space_totals,
        crate::patterns::pattern,
        crate::patterns::list,
        crate::spaces::routes::create,
        crate::spaces::routes::get,
        crate::spaces::routes::list,
        crate::spaces::routes::participants,
        crate::spaces::routes::join,
        crate::spaces::routes::leave,
        crate::spaces::routes::close,
        crate::spaces::sessions::start,
        crate::spaces::sessions::set_level,
        crate::spaces::sessions::heartbeat,
        crate::spaces::sessions::end,
        crate::billing::subscription,
        crate::billing::checkout::checkout,
        crate::billing::checkout::portal,
        crate::billing::webhook::stripe_webhook,
    ),
    tags(
        (name = "citizens", description = "Venice citizens (the ledger), cached; served stale within a bound while Venice fails."),
        (name = "billing", description = "Stripe subscriptions: signed webhooks applied exactly once and in any order; 503 `billing_not_configured` without Stripe settings."),
        (name = "economics", description = "The ducat/USD bridge: exact amounts as decimal strings, rounded half-even to the cent."),
        (name = "patterns", description = "Consciousness patterns computed from Venice's lists (counts and an emergence score), stored until they expire and refreshed in the background."),
        (name = "spaces", description = "Collaboration spaces: joining needs an active consciousness session at the space's threshold; the participant limit holds under any concurrency. Creating one needs a paid tier."),
        (name = "consciousness", description = "Consciousness sessions: a level in [0, 1] with two decimals, as a string; verified at VERIFICATION_THRESHOLD; ended after CONSCIOUSNESS_SESSION_IDLE without a heartbeat."),
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

/// The body of `POST /spaces`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSpace {
    /// The space's public id: lower-case letters, digits and `-`, not at either end.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$",
        example = "salon-veneziano"
    )]
    pub space_id: String,
    /// 1 to 255 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub title: String,
    /// At most 4,000 characters; no control characters but newlines and tabs.
    #[schema(
        max_length = 4000,
        pattern = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$"
    )]
    pub description: Option<String>,
    /// 1 to 1,000 (default 10).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_participants: Option<i32>,
    /// Default `"0.50"`.
    #[schema(pattern = r"^(0(\.[0-9]{1,2})?|1(\.0{1,2})?)$", example = "0.50")]
    pub consciousness_threshold: Option<String>,
}

/// A collaboration space.
#[derive(ToSchema)]
pub struct Space {
    pub space_id: String,
    pub title: String,
    pub description: String,
    /// The creator's username.
    pub creator: String,
    pub max_participants: i32,
    /// Two decimals, e.g. `"0.50"`.
    #[schema(example = "0.50")]
    pub consciousness_threshold: String,
    /// Present on `GET /spaces/{space_id}` and writes; not on list pages.
    #[schema(nullable = false)]
    pub participant_count: Option<i32>,
    pub is_active: bool,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub closed_at: Option<String>,
}

/// A page of `GET /spaces`.
#[derive(ToSchema)]
pub struct SpacePage {
    pub items: Vec<Space>,
    /// The `cursor` of the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Who is in a space.
#[derive(ToSchema)]
pub struct Participants {
    pub space_id: String,
    pub max_participants: i32,
    pub count: i32,
    pub participants: Vec<Participant>,
}

#[derive(ToSchema)]
pub struct Participant {
    pub username: String,
    pub joined_at: String,
}

/// The space in the path.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Path)]
pub struct SpacePath {
    #[param(
        min_length = 1,
        max_length = 100,
        pattern = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$"
    )]
    space_id: String,
}

/// `GET /spaces` filters.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Query)]
pub struct SpaceListParams {
    /// Only open (`true`) or closed (`false`) spaces.
    active: Option<bool>,
    /// Only this user's spaces (a username, any case).
    #[param(
        min_length = 3,
        max_length = 32,
        pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}$"
    )]
    creator: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// The body of `POST /consciousness/sessions`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewConsciousnessSession {
    /// Binds the session to a space (open, existing); one active session per user per space.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$"
    )]
    pub space_id: Option<String>,
    #[schema(pattern = r"^(0(\.[0-9]{1,2})?|1(\.0{1,2})?)$", example = "0.75")]
    pub consciousness_level: String,
}

/// The body of `PATCH /consciousness/sessions/{id}`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelChange {
    #[schema(pattern = r"^(0(\.[0-9]{1,2})?|1(\.0{1,2})?)$", example = "0.90")]
    pub consciousness_level: String,
}

/// A consciousness session.
#[derive(ToSchema)]
pub struct ConsciousnessSession {
    pub id: i32,
    pub space_id: Option<String>,
    #[schema(example = "0.75")]
    pub consciousness_level: String,
    /// `consciousness_level` is at least `VERIFICATION_THRESHOLD`.
    pub verified: bool,
    pub is_active: bool,
    pub started_at: String,
    pub last_activity: String,
    pub ended_at: Option<String>,
    /// `ended` or `idle`.
    pub end_reason: Option<String>,
    /// Only in the answer that starts the session.
    #[schema(nullable = false)]
    pub session_token: Option<String>,
}

/// The session in the path.
#[derive(IntoParams, serde::Deserialize)]
#[into_params(parameter_in = Path)]
pub struct SessionPath {
    #[param(minimum = 1, maximum = 2147483647)]
    id: i32,
}

/// The caller's tier and latest subscription.
#[derive(ToSchema)]
pub struct BillingSubscription {
    /// The account's tier: a paid tier of `STRIPE_PRICES_JSON`, or `observer`.
    pub tier: String,
    /// The tier as this request's session has it (refreshed on every instance when the tier
    /// changes): any tier of `STRIPE_PRICES_JSON` as it is named, which the application's tier
    /// table treats as paid.
    pub gate_tier: String,
    #[schema(nullable = true)]
    pub subscription: Option<SubscriptionView>,
}

#[derive(ToSchema)]
pub struct SubscriptionView {
    /// Stripe's subscription id.
    pub id: String,
    /// Stripe's status (`active`, `trialing`, `past_due`, `unpaid`, `canceled`, ...).
    pub status: String,
    pub tier: String,
    /// End of the paid period (RFC 3339, UTC), if Stripe gave one.
    #[schema(nullable = true)]
    pub current_period_end: Option<String>,
}

/// A Stripe event as Stripe sends it (only the fields Cascade reads are listed).
#[derive(ToSchema)]
pub struct StripeEvent {
    pub id: String,
    /// `checkout.session.completed`, `customer.subscription.created|updated|deleted`,
    /// `invoice.paid`, `invoice.payment_failed`; other types are acknowledged and ignored.
    #[schema(rename = "type")]
    pub kind: String,
    /// Unix seconds.
    pub created: i64,
    pub data: JsonObject,
}

/// The acknowledgement of a delivery.
#[derive(ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// `applied`, `duplicate` (processed before: no effect), `older` (recorded; the
    /// subscription already holds newer state: no effect) or `ignored` (a type not handled).
    pub outcome: String,
}

/// A Stripe Checkout session.
#[derive(ToSchema)]
pub struct CheckoutSession {
    /// Stripe's session id.
    pub id: String,
    /// Where to send the customer to pay.
    pub url: String,
    pub tier: String,
}

/// A Stripe customer portal session.
#[derive(ToSchema)]
pub struct PortalSession {
    pub id: String,
    /// Where to send the customer to manage their subscription.
    pub url: String,
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

/// A page of the caller's investments, newest first.
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
