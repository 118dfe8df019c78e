//! Stripe billing (seed 001's payment flow, issue 16): configuration, the signed webhook
//! endpoint that moves subscriptions and tiers, and the caller's subscription.
//!
//! - [`signature`]: `Stripe-Signature` verification on the raw body;
//! - [`webhook`]: `POST /webhooks/stripe`, each event applied exactly once and in any order;
//! - [`checkout`]: `POST /billing/checkout`, through the `stripe` connector, idempotent;
//! - [`reconcile`]: Stripe's recent events listed and applied as webhooks are, so a lost
//!   delivery is healed (a background task, once cluster-wide per interval);
//! - `GET /billing/subscription`: the caller's tier and subscription.
//!
//! Without `STRIPE_API_KEY` the billing routes answer 503 `billing_not_configured` (and without
//! `STRIPE_WEBHOOK_SECRET` the webhook endpoint does); the rest of Cascade runs.

pub mod checkout;
pub mod reconcile;
pub mod signature;
pub mod webhook;

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use cascade_core::config::{Parser, Secret};
use cascade_http::{ApiError, CurrentUser};
use serde_json::{Value, json};

use crate::AppModuleState;
use crate::config::RawAppConfig;

/// Webhook deliveries by `outcome`: `applied`, `duplicate`, `older` (recorded, its subscription
/// already newer), `ignored` (an event type we do not handle), `refused` (with a `reason`: a signature problem or a malformed body), `failed`;
/// and `unknown_price` for an applied subscription event whose price `STRIPE_PRICES_JSON`
/// does not name (also counted as `applied`), and `decided_without_stripe` (with a `reason`:
/// `no_api_key`, `api_key_refused`) for an event in doubt decided without Stripe's copy.
pub const STRIPE_WEBHOOKS: &str = "cascade_stripe_webhooks_total";

/// Gives [`STRIPE_WEBHOOKS`] its `# HELP` line (the application calls it when it builds its
/// router).
pub fn describe_metrics() {
    metrics::describe_counter!(
        STRIPE_WEBHOOKS,
        "Stripe webhook deliveries by outcome (applied, duplicate, older, ignored, refused with a reason, failed, unknown_price, decided_without_stripe with a reason)"
    );
    reconcile::describe_metrics();
}

/// The tier of an account without an entitling subscription.
pub use crate::tiers::FREE_TIER;

/// Stripe's settings (`STRIPE_*`).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub api_url: String,
    pub api_key: Option<Secret>,
    /// Every secret whose signatures are accepted: several while a secret is being rolled.
    pub webhook_secrets: Vec<Secret>,
    /// Paid tier → Stripe price id (`STRIPE_PRICES_JSON`); a subscription's tier is its price's.
    pub prices: BTreeMap<String, String>,
    pub success_url: String,
    pub cancel_url: String,
    /// Bound of a whole Stripe API call, retries included.
    pub request_timeout: std::time::Duration,
    /// How often [`reconcile`] runs (`STRIPE_RECONCILE_INTERVAL`); `None`: never.
    pub reconcile_interval: Option<std::time::Duration>,
}

impl StripeConfig {
    pub fn parse(p: &mut Parser, raw: &RawAppConfig) -> StripeConfig {
        let webhook_secrets = raw
            .stripe_webhook_secret
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect();
        StripeConfig {
            api_url: p.http_url(
                "STRIPE_API_URL",
                &raw.stripe_api_url,
                "https://api.stripe.com",
            ),
            api_key: p.secret(&raw.stripe_api_key),
            webhook_secrets,
            prices: parse_prices(p, raw.stripe_prices_json.as_deref()),
            success_url: p.http_url(
                "STRIPE_SUCCESS_URL",
                &raw.stripe_success_url,
                "http://localhost:3000/billing/success",
            ),
            cancel_url: p.http_url(
                "STRIPE_CANCEL_URL",
                &raw.stripe_cancel_url,
                "http://localhost:3000/billing/cancel",
            ),
            request_timeout: p.positive_duration(
                "STRIPE_REQUEST_TIMEOUT",
                &raw.stripe_request_timeout,
                std::time::Duration::from_secs(10),
            ),
            reconcile_interval: Some(p.duration(
                "STRIPE_RECONCILE_INTERVAL",
                &raw.stripe_reconcile_interval,
                std::time::Duration::from_secs(600),
            ))
            .filter(|every| !every.is_zero()),
        }
    }

    /// The paid tier whose price is `price_id`, if one is configured.
    pub fn tier_of_price(&self, price_id: &str) -> Option<&str> {
        self.prices
            .iter()
            .find(|(_, price)| price.as_str() == price_id)
            .map(|(tier, _)| tier.as_str())
    }

    /// Rows for `cascade config`: keys and secrets only as "set".
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let prices = serde_json::to_string(&self.prices).unwrap_or_default();
        vec![
            ("STRIPE_API_URL", self.api_url.clone()),
            (
                "STRIPE_API_KEY",
                match self.api_key {
                    Some(_) => "*** (set)".to_string(),
                    None => "(not set)".to_string(),
                },
            ),
            (
                "STRIPE_WEBHOOK_SECRET",
                match self.webhook_secrets.len() {
                    0 => "(not set)".to_string(),
                    1 => "*** (set)".to_string(),
                    n => format!("*** ({n} secrets set)"),
                },
            ),
            ("STRIPE_PRICES_JSON", prices),
            ("STRIPE_SUCCESS_URL", self.success_url.clone()),
            ("STRIPE_CANCEL_URL", self.cancel_url.clone()),
            (
                "STRIPE_REQUEST_TIMEOUT",
                format!("{}s", self.request_timeout.as_secs_f64()),
            ),
            (
                "STRIPE_RECONCILE_INTERVAL",
                match self.reconcile_interval {
                    Some(every) => format!("{}s", every.as_secs_f64()),
                    None => "0 (off)".to_string(),
                },
            ),
        ]
    }
}

/// `STRIPE_PRICES_JSON`: an object of tier names (lowercase `[a-z][a-z0-9_]*`, at most 50
/// bytes as `subscription_tier` holds, never the free tier) to distinct, non-empty price ids.
fn parse_prices(p: &mut Parser, raw: Option<&str>) -> BTreeMap<String, String> {
    const VAR: &str = "STRIPE_PRICES_JSON";
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return BTreeMap::new();
    };
    let prices: BTreeMap<String, String> = match serde_json::from_str(raw) {
        Ok(prices) => prices,
        Err(err) => {
            p.fail(
                VAR,
                format!("expected a JSON object of tier to price id strings: {err}"),
            );
            return BTreeMap::new();
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for (tier, price) in &prices {
        let valid_name = tier.len() <= 50
            && tier.starts_with(|c: char| c.is_ascii_lowercase())
            && tier
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid_name {
            p.fail(
                VAR,
                format!("tier {tier:?}: expected lowercase letters, digits and _, at most 50"),
            );
        } else if tier == FREE_TIER {
            p.fail(
                VAR,
                format!("{FREE_TIER:?} is the free tier and has no price"),
            );
        }
        let price = price.trim();
        if price.is_empty() || price.len() > 255 {
            p.fail(
                VAR,
                format!("tier {tier:?}: the price id must be 1 to 255 bytes"),
            );
        } else if !seen.insert(price.to_string()) {
            p.fail(VAR, format!("price {price:?} is given to two tiers"));
        }
    }
    prices
        .into_iter()
        .map(|(tier, price)| (tier, price.trim().to_string()))
        .collect()
}

/// The answer of a billing route while Stripe is not configured.
pub fn not_configured(what: &str) -> ApiError {
    ApiError::BillingNotConfigured(format!(
        "billing is not configured on this server ({what} is not set)"
    ))
}

/// `GET /billing/subscription`.
#[utoipa::path(get, path = "/billing/subscription", tag = "billing", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's tier and latest subscription (null if none)", body = crate::openapi::BillingSubscription),
        (status = 401, description = "No valid access token"),
        (status = 503, description = "Billing is not configured (`billing_not_configured`), or PostgreSQL is unavailable"),
    )
)]
pub async fn subscription(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<Value>, ApiError> {
    if state.config.stripe.api_key.is_none() {
        return Err(not_configured("STRIPE_API_KEY"));
    }
    let conn = state.app.db.conn().await?;
    let tier: String = conn
        .query_opt(
            "SELECT subscription_tier FROM cascade_users WHERE id = $1",
            &[&me.user_id],
        )
        .await
        .map_err(cascade_core::db::DbError::from)?
        .ok_or_else(|| ApiError::NotFound("no such account".into()))?
        .get(0);
    let row = conn
        .query_opt(
            "SELECT stripe_subscription_id, status, tier, \
                    to_char(current_period_end, 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             FROM cascade_subscriptions WHERE user_id = $1 \
             ORDER BY status_at DESC, id DESC LIMIT 1",
            &[&me.user_id],
        )
        .await
        .map_err(cascade_core::db::DbError::from)?;
    let subscription = row.map(|row| {
        json!({
            "id": row.get::<_, Option<String>>(0),
            "status": row.get::<_, String>(1),
            "tier": row.get::<_, String>(2),
            "current_period_end": row.get::<_, Option<String>>(3),
        })
    });
    Ok(Json(json!({
        "tier": tier,
        "gate_tier": me.tier.as_str(),
        "subscription": subscription,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(raw: &str) -> Result<BTreeMap<String, String>, Vec<String>> {
        let mut p = Parser::new();
        let prices = parse_prices(&mut p, Some(raw));
        p.finish(prices)
            .map_err(|e| e.0.iter().map(|i| i.message.clone()).collect())
    }

    #[test]
    fn prices_name_paid_tiers_and_distinct_ids() {
        let ok = prices(r#"{"explorer":"price_1","architect":" price_2 "}"#).unwrap();
        assert_eq!(ok["architect"], "price_2");
        for bad in [
            "[]",
            r#"{"explorer":1}"#,
            r#"{"Explorer":"price_1"}"#,
            r#"{"observer":"price_1"}"#,
            r#"{"a":"price_1","b":"price_1"}"#,
            r#"{"a":""}"#,
        ] {
            assert!(prices(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reconciliation_runs_every_ten_minutes_unless_zero() {
        let interval = |raw: Option<&str>| {
            let raw = RawAppConfig {
                stripe_reconcile_interval: raw.map(String::from),
                ..RawAppConfig::default()
            };
            let mut p = Parser::new();
            let config = StripeConfig::parse(&mut p, &raw);
            p.finish(config.reconcile_interval).map_err(|_| ())
        };
        let minutes = |m: u64| Ok(Some(std::time::Duration::from_secs(m * 60)));
        assert_eq!(interval(None), minutes(10));
        assert_eq!(interval(Some("2m")), minutes(2));
        assert_eq!(interval(Some("0")), Ok(None));
        assert_eq!(interval(Some("soon")), Err(()));
    }

    #[test]
    fn webhook_secrets_are_comma_separated_and_redacted() {
        let raw = RawAppConfig {
            stripe_webhook_secret: Some("whsec_new, whsec_old,".into()),
            ..RawAppConfig::default()
        };
        let mut p = Parser::new();
        let config = StripeConfig::parse(&mut p, &raw);
        assert_eq!(config.webhook_secrets.len(), 2);
        assert_eq!(config.webhook_secrets[1].expose(), "whsec_old");
        let shown = format!("{:?}", config.describe());
        assert!(!shown.contains("whsec_"), "{shown}");
        assert!(shown.contains("2 secrets set"), "{shown}");
        assert!(p.finish(()).is_ok());
    }
}
