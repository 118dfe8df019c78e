//! `POST /billing/checkout {"tier"}`: a Stripe Checkout session in subscription mode for the
//! caller, through the core's upstream connector (`stripe`: deadline, retries, breaker,
//! metrics), form-encoded with the bearer key.
//!
//! Every POST carries Stripe's `Idempotency-Key`, so a retried call never creates twice:
//! - the account's customer is created once, with key `cascade-customer-{user}`, and its id
//!   kept in `cascade_users.stripe_customer_id`;
//! - the session's key is `cascade-checkout-{user}-{tier}-{k}`, where `k` is the client's own
//!   `Idempotency-Key` header if it sent one, else the current ten-minute window: a client that
//!   retries after a timeout, or clicks twice, gets the same session, not a second one.
//!
//! `POST /billing/portal`: a customer portal session (manage or cancel the subscription) for
//! an account that has a Stripe customer; its changes come back as webhooks.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use cascade_core::db::DbError;
use cascade_core::upstream::{Connector, UpstreamError, UpstreamSettings};
use cascade_http::{ApiError, CurrentUser, JsonBody};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;

use super::{StripeConfig, not_configured};
use crate::AppModuleState;

/// The upstream's name in metrics, logs, errors and `/health/db`.
pub const UPSTREAM: &str = "stripe";

/// The longest client `Idempotency-Key` accepted (Stripe's own limit).
const CLIENT_KEY_MAX: usize = 255;

/// The Stripe connector. Billing posts (customers, checkout and portal sessions) and reads
/// uncached (`get_uncached`: a subscription in doubt, the events reconciliation lists), so
/// its cache namespaces are never used.
pub fn connector(
    config: &StripeConfig,
    cache: cascade_core::cache::Cache,
) -> reqwest::Result<Connector> {
    Connector::new(
        UpstreamSettings {
            name: UPSTREAM,
            base_url: config.api_url.clone(),
            api_key: config.api_key.clone(),
            connect_timeout: Duration::from_secs(5).min(config.request_timeout),
            request_timeout: config.request_timeout,
            pool_size: 8,
            retries: 2,
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(30),
            namespace: UPSTREAM,
            last_good_namespace: UPSTREAM,
            stale_if_error: Duration::ZERO,
        },
        cache,
    )
}

/// The body of `POST /billing/checkout`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// A paid tier of `STRIPE_PRICES_JSON`.
    pub tier: String,
}

/// `POST /billing/checkout`.
#[utoipa::path(post, path = "/billing/checkout", tag = "billing", security(("bearer" = [])),
    request_body = CheckoutBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Optional: retries with the same key get the same session (without one, retries within ten minutes do)")),
    responses(
        (status = 200, description = "The Checkout session: send the customer to its `url`", body = crate::openapi::CheckoutSession),
        (status = 400, description = "Not a paid tier of this server, or a malformed body or key"),
        (status = 401, description = "No valid access token"),
        (status = 503, description = "Billing is not configured (`billing_not_configured`), or Stripe is unavailable (Retry-After)"),
    )
)]
pub async fn checkout(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CheckoutBody>,
) -> Result<Json<Value>, ApiError> {
    let config = &state.config.stripe;
    if config.api_key.is_none() {
        return Err(not_configured("STRIPE_API_KEY"));
    }
    let Some(price) = config.prices.get(&body.tier) else {
        let tiers: Vec<&str> = config.prices.keys().map(String::as_str).collect();
        return Err(ApiError::bad_request(
            "tier",
            format!("not a paid tier of this server (paid tiers: {tiers:?})"),
        ));
    };
    let attempt = match headers.get("idempotency-key") {
        None => format!("w{}", super::webhook::unix_now() / 600),
        Some(value) => {
            let key = value.to_str().ok().filter(|k| {
                !k.is_empty()
                    && k.len() <= CLIENT_KEY_MAX
                    && k.bytes().all(|b| b.is_ascii_graphic())
            });
            let key = key.ok_or_else(|| {
                ApiError::bad_request(
                    "Idempotency-Key",
                    format!("must be 1 to {CLIENT_KEY_MAX} printable ASCII characters"),
                )
            })?;
            // Hashed: Stripe's own key is at most 255 characters, and ours wraps the client's.
            let digest = sha2::Sha256::digest(key.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("c{hex}")
        }
    };
    let customer = customer_of(&state, me.user_id).await?;
    let user = me.user_id.to_string();
    let form = [
        ("mode", "subscription"),
        ("customer", customer.as_str()),
        ("line_items[0][price]", price.as_str()),
        ("line_items[0][quantity]", "1"),
        ("success_url", config.success_url.as_str()),
        ("cancel_url", config.cancel_url.as_str()),
        ("client_reference_id", user.as_str()),
        (
            "subscription_data[metadata][cascade_user_id]",
            user.as_str(),
        ),
    ];
    let key = format!("cascade-checkout-{user}-{}-{attempt}", body.tier);
    let session = post(&state.stripe, "/v1/checkout/sessions", &form, &key).await?;
    Ok(Json(json!({
        "id": session.get("id"),
        "url": session.get("url"),
        "tier": body.tier,
    })))
}

/// `POST /billing/portal`.
#[utoipa::path(post, path = "/billing/portal", tag = "billing", security(("bearer" = [])),
    responses(
        (status = 200, description = "A Stripe customer portal session: send the customer to its `url`", body = crate::openapi::PortalSession),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "The account has no Stripe customer yet (it never started a checkout)"),
        (status = 503, description = "Billing is not configured (`billing_not_configured`), or Stripe is unavailable (Retry-After)"),
    )
)]
pub async fn portal(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<Value>, ApiError> {
    let config = &state.config.stripe;
    if config.api_key.is_none() {
        return Err(not_configured("STRIPE_API_KEY"));
    }
    let conn = state.app.db.conn().await?;
    let customer: Option<String> = conn
        .query_opt(
            "SELECT stripe_customer_id FROM cascade_users WHERE id = $1",
            &[&me.user_id],
        )
        .await
        .map_err(DbError::from)?
        .and_then(|row| row.get(0));
    drop(conn);
    let customer = customer.ok_or_else(|| {
        ApiError::NotFound("this account has no Stripe customer yet: start a checkout".into())
    })?;
    let form = [
        ("customer", customer.as_str()),
        ("return_url", config.success_url.as_str()),
    ];
    // Within a ten-minute window, a retry gets the same portal session.
    let key = format!(
        "cascade-portal-{}-w{}",
        me.user_id,
        super::webhook::unix_now() / 600
    );
    let session = post(&state.stripe, "/v1/billing_portal/sessions", &form, &key).await?;
    Ok(Json(
        json!({ "id": session.get("id"), "url": session.get("url") }),
    ))
}

/// The account's Stripe customer, created (once) if it has none.
async fn customer_of(state: &AppModuleState, user_id: i64) -> Result<String, ApiError> {
    let conn = state.app.db.conn().await?;
    let row = conn
        .query_opt(
            "SELECT stripe_customer_id, email FROM cascade_users WHERE id = $1",
            &[&user_id],
        )
        .await
        .map_err(DbError::from)?
        .ok_or_else(|| ApiError::NotFound("no such account".into()))?;
    if let Some(customer) = row.get::<_, Option<String>>(0) {
        return Ok(customer);
    }
    drop(conn);
    let email: Option<String> = row.get(1);
    let user = user_id.to_string();
    let mut form = vec![("metadata[cascade_user_id]", user.as_str())];
    if let Some(email) = &email {
        form.push(("email", email.as_str()));
    }
    let customer = post(
        &state.stripe,
        "/v1/customers",
        &form,
        &format!("cascade-customer-{user_id}"),
    )
    .await?;
    let id = customer
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("Stripe's customer has no id")))?;
    // Two concurrent first checkouts got the same customer (same key): either write is right.
    let conn = state.app.db.conn().await?;
    conn.execute(
        "UPDATE cascade_users SET stripe_customer_id = $2, updated_at = now() \
         WHERE id = $1 AND stripe_customer_id IS NULL",
        &[&user_id, &id],
    )
    .await
    .map_err(DbError::from)?;
    Ok(id.to_string())
}

/// One Stripe POST: its JSON on 2xx; Stripe's refusal (a bad key or price: our configuration)
/// is a 500 with the reason logged; no answer is a 503 naming Stripe.
async fn post(
    stripe: &Connector,
    path: &str,
    form: &[(&str, &str)],
    key: &str,
) -> Result<Value, ApiError> {
    match stripe.post_form(path, form, key).await {
        Ok((status, body)) if (200..300).contains(&status) => Ok(body),
        Ok((status, body)) => Err(ApiError::Internal(anyhow::anyhow!(
            "Stripe refused POST {path}: HTTP {status}: {}",
            body.pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
        ))),
        Err(UpstreamError::Unavailable {
            cause, retry_after, ..
        }) => Err(ApiError::Unavailable {
            message: format!("Stripe is unavailable ({cause}); retry with the same request"),
            retry_after,
        }),
    }
}
