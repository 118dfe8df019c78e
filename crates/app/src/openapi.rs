//! The application's part of the API document: its paths (the `#[utoipa::path]` attributes
//! on its handlers) and the schemas of their bodies.

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    paths(crate::citizens::citizen, crate::accounts::link, crate::accounts::unlink, crate::economics::quote_route, crate::billing::subscription, crate::billing::checkout::checkout, crate::billing::checkout::portal, crate::billing::webhook::stripe_webhook),
    tags(
        (name = "citizens", description = "Venice citizens (the ledger), cached; served stale within a bound while Venice fails."),
        (name = "billing", description = "Stripe subscriptions: signed webhooks applied exactly once and in any order; 503 `billing_not_configured` without Stripe settings."),
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

/// The caller's tier and latest subscription.
#[derive(ToSchema)]
pub struct BillingSubscription {
    /// The account's tier: a paid tier of `STRIPE_PRICES_JSON`, or `observer`.
    pub tier: String,
    /// The tier that tier gates apply to this request (the session's copy, refreshed on every
    /// instance when the tier changes); a paid tier the platform's `Tier` does not know (such
    /// as `explorer`) ranks as `observer` there.
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
    /// `applied`, `duplicate` (processed before: no effect) or `ignored` (a type not handled).
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
