//! `POST /webhooks/stripe`: Stripe's events move subscriptions and tiers.
//!
//! Stripe delivers an event more than once, in no guaranteed order, and retries failures for
//! up to three days. So:
//!
//! - **Verified first.** The raw body is checked against `Stripe-Signature` before it is parsed
//!   ([`signature`](super::signature)); a refusal is a 400, writes nothing and is counted.
//! - **Exactly once.** The event's id is inserted into `cascade_stripe_events` in the same
//!   transaction as its effect. A concurrent duplicate blocks on that unique key until the first
//!   commits, then finds it and is acknowledged without effect; if the first rolls back, the
//!   duplicate does the work. Any failure rolls everything back and answers 500: Stripe retries.
//! - **Order does not matter.** A subscription row keeps two clocks, the `created` time of the
//!   event its object fields (price, tier, period) came from (`object_at`) and that of the event
//!   its status came from (`status_at`). An event changes a part only if it is not older than
//!   that part's clock (ties: the later arrival wins), and `canceled` is final, as at Stripe.
//!   Subscription events carry both parts; invoice events only the status. Delivered in any
//!   order, the row ends as the newest events say, as if delivered in order.
//! - **When in doubt, Stripe decides.** Stripe's `created` is in whole seconds. When an event
//!   has the same second as a part's clock and would change that part in a way the clocks
//!   cannot order (another price or period; another status: a recovery, `past_due` back to
//!   `active`, can share the second of the failure), or when an invoice
//!   names a subscription this database has never seen, the subscription is fetched from
//!   Stripe (`GET /v1/subscriptions/{id}`, the `stripe` connector) and that object is applied
//!   with the event's clock instead of the event's own: Stripe's present state wins the tie,
//!   its status included (only `canceled` stays final).
//!   The fetch happens outside the transaction (the event's transaction is rolled back and
//!   redone with the fetched object); Stripe unreachable is a 503, and Stripe retries.
//!   Stripe cannot be asked at all when `STRIPE_API_KEY` is not set (the webhook needs only
//!   `STRIPE_WEBHOOK_SECRET`) or when Stripe refuses the key (401/403, a configuration error:
//!   logged as an error): then the event is decided as if Stripe had no such subscription
//!   (the clocks' rules; an invoice for an unknown subscription has no effect), counted as
//!   `decided_without_stripe` with a `reason` (`no_api_key`, `api_key_refused`).
//! - **The tier follows.** An account's `subscription_tier` is the tier of its most recent
//!   subscription (by `object_at`) whose status entitles (`active`, `trialing`, `past_due`)
//!   and whose price has a paid tier (an unknown price never hides a paid one), else
//!   `observer`: recomputed in the same transaction, under a lock on the account row.
//!   Grace: `past_due` (a failed payment Stripe is still retrying) keeps the tier; when Stripe's
//!   retries are exhausted it moves the subscription to `unpaid` or `canceled`, and the tier
//!   returns to `observer`. A changed tier drops the account's cached sessions on every
//!   instance once the transaction has committed, so the next request sees it.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use cascade_core::db::DbError;
use cascade_http::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Transaction;

use super::{FREE_TIER, STRIPE_WEBHOOKS, StripeConfig, not_configured, signature};
use crate::AppModuleState;

/// Subscription statuses that give their tier (see the module's grace rule).
const ENTITLED: &[&str] = &["active", "trialing", "past_due"];

/// The event types that have an effect; others are acknowledged and counted as ignored.
const HANDLED: &[&str] = &[
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
];

/// The parts of a Stripe event we read.
#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds, Stripe's clock: the order of events.
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: Value,
}

/// What a delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect is committed; the account whose tier it changed, if one.
    Applied(Option<TierChange>),
    /// The event was processed before (or by a concurrent delivery): no effect.
    Duplicate,
    /// Recorded, but the subscription already holds newer state (its clocks are past the
    /// event's): no effect.
    Older,
    /// A type we do not handle.
    Ignored,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Older => "older",
            Outcome::Ignored => "ignored",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierChange {
    pub user_id: i64,
    pub from: String,
    pub to: String,
}

/// A processing failure: the transaction is rolled back and Stripe retries.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// A handled event without a field its handling needs.
    #[error("event {event}: {message}")]
    Shape { event: String, message: String },
    /// The event needed Stripe's copy of its subscription, and Stripe did not give it.
    #[error("event {event}: fetching its subscription from Stripe: {message}")]
    Stripe { event: String, message: String },
}

impl From<tokio_postgres::Error> for ProcessError {
    fn from(err: tokio_postgres::Error) -> Self {
        ProcessError::Db(DbError::from(err))
    }
}

/// `POST /webhooks/stripe`.
#[utoipa::path(post, path = "/webhooks/stripe", tag = "billing",
    request_body(content = crate::openapi::StripeEvent, description = "A Stripe event, signed (`Stripe-Signature`)"),
    params(("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256 of {t}.{body}>[,v1=…]")),
    responses(
        (status = 200, description = "Processed, or already processed, or a type that is not handled", body = crate::openapi::WebhookAck),
        (status = 400, description = "Missing, malformed, stale or wrong signature, or not a Stripe event: nothing written"),
        (status = 500, description = "Processing failed and left no trace; Stripe retries"),
        (status = 503, description = "No STRIPE_WEBHOOK_SECRET (`billing_not_configured`), or PostgreSQL is unavailable; Stripe retries"),
    )
)]
pub async fn stripe_webhook(
    State(state): State<AppModuleState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let config = &state.config.stripe;
    if config.webhook_secrets.is_empty() {
        return Err(not_configured("STRIPE_WEBHOOK_SECRET"));
    }
    let header = headers.get("stripe-signature").map(|v| v.as_bytes());
    if let Err(err) = signature::verify(header, &body, &config.webhook_secrets, unix_now()) {
        return Err(refuse(err.reason(), "Stripe-Signature", err.to_string()));
    }
    let event: Event = serde_json::from_slice(&body).map_err(|err| {
        refuse(
            "malformed_event",
            "body",
            format!("the body is not a Stripe event: {err}"),
        )
    })?;
    if event.id.is_empty() || event.id.len() > 255 {
        return Err(refuse(
            "malformed_event",
            "id",
            "the event id must be 1 to 255 bytes".into(),
        ));
    }
    // Once begun, processing and the invalidation after it finish even if Stripe hangs up.
    let detached = state.app.detached.clone();
    let outcome = detached
        .run(async move { handle(&state, &event).await })
        .await
        .map_err(|_| ApiError::Unavailable {
            message: "the server is stopping".into(),
            retry_after: std::time::Duration::from_secs(1),
        })??;
    Ok(Json(
        json!({ "received": true, "outcome": outcome.label() }),
    ))
}

fn refuse(reason: &'static str, field: &'static str, message: String) -> ApiError {
    metrics::counter!(STRIPE_WEBHOOKS, "outcome" => "refused", "reason" => reason).increment(1);
    tracing::warn!(reason, "Stripe webhook refused: {message}");
    ApiError::bad_request(field, message)
}

/// Applies `event` and, once committed, makes a tier change visible everywhere.
pub async fn handle(state: &AppModuleState, event: &Event) -> Result<Outcome, ApiError> {
    let outcome = match apply(state, event).await {
        Ok(outcome) => outcome,
        Err(err) => {
            metrics::counter!(STRIPE_WEBHOOKS, "outcome" => "failed").increment(1);
            tracing::error!(event = %event.id, kind = %event.kind, error = %err, "Stripe event not processed; Stripe will retry");
            return Err(match err {
                ProcessError::Db(err) => ApiError::from(err),
                ProcessError::Stripe { .. } => ApiError::Unavailable {
                    message: err.to_string(),
                    retry_after: std::time::Duration::from_secs(1),
                },
                other => ApiError::Internal(anyhow::Error::new(other)),
            });
        }
    };
    metrics::counter!(STRIPE_WEBHOOKS, "outcome" => outcome.label()).increment(1);
    if let Outcome::Applied(Some(change)) = &outcome {
        announce(state, change).await;
    }
    Ok(outcome)
}

/// A committed tier change: every cached session of the account is dropped (acknowledged by
/// every instance: `Principal.tier` is read from the session's cached copy), so the next
/// request on any instance loads the new tier from `cascade_users`. Then it is announced as
/// `tier_changed` on channel `user:{id}` with [`tier_changed`]'s payload, on the domain-event
/// bus (`cascade_core::events`): every instance hears it.
pub(crate) async fn announce(state: &AppModuleState, change: &TierChange) {
    state
        .app
        .cache
        .invalidate_tag(&format!("user:{}", change.user_id))
        .await;
    let channel = format!("user:{}", change.user_id);
    // After the commit; a failed publish is logged and counted by the events bus, and the
    // tier itself is already in place (the event is a notification, not the state).
    let _ = state
        .app
        .events
        .publish(&channel, "tier_changed", tier_changed(change))
        .await;
}

/// The payload of a `tier_changed` event.
pub fn tier_changed(change: &TierChange) -> Value {
    json!({ "user_id": change.user_id, "from": change.from, "to": change.to })
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Stripe's copy of a subscription, asked for when an event cannot be ordered by its clocks.
#[derive(Debug, Clone)]
enum Fetched {
    /// Not asked (yet): the event's own object is applied.
    No,
    /// Stripe has no such subscription: the event is applied as it is.
    Missing,
    /// Stripe's present object: applied with the event's clock, winning a tie.
    Object(Value),
}

/// What one transaction did: done, or it found the event in doubt (see the module) and was
/// rolled back so the subscription can be fetched without holding locks.
enum Attempt {
    Done(Outcome),
    InDoubt(String),
}

/// The event's effect and its dedupe row, in one transaction (two, the first rolled back,
/// when the subscription must be fetched from Stripe first).
pub async fn apply(state: &AppModuleState, event: &Event) -> Result<Outcome, ProcessError> {
    if !HANDLED.contains(&event.kind.as_str()) {
        return Ok(Outcome::Ignored);
    }
    let (db, config) = (&state.app.db, &state.config.stripe);
    let subscription = match attempt(db, config, event, &Fetched::No).await? {
        Attempt::Done(outcome) => return Ok(outcome),
        Attempt::InDoubt(subscription) => subscription,
    };
    let fetched = if config.api_key.is_none() {
        // The webhook route runs with only STRIPE_WEBHOOK_SECRET: Stripe cannot be asked, and
        // a 503 would be retried for three days to the same end. Decided by the clocks alone.
        undecided(event, &subscription, "no_api_key");
        Fetched::Missing
    } else {
        fetch_subscription(&state.stripe, event, &subscription).await?
    };
    tracing::info!(event = %event.id, subscription, found = matches!(fetched, Fetched::Object(_)), "Stripe event in doubt: applied Stripe's copy of its subscription (if found)");
    match attempt(db, config, event, &fetched).await? {
        Attempt::Done(outcome) => Ok(outcome),
        Attempt::InDoubt(_) => Err(ProcessError::Shape {
            event: event.id.clone(),
            message: "still in doubt after fetching its subscription".into(),
        }),
    }
}

/// `GET /v1/subscriptions/{id}` through the `stripe` connector.
async fn fetch_subscription(
    stripe: &cascade_core::upstream::Connector,
    event: &Event,
    id: &str,
) -> Result<Fetched, ProcessError> {
    let failed = |message: String| ProcessError::Stripe {
        event: event.id.clone(),
        message,
    };
    // Stripe's ids are `sub_` and letters and digits: nothing to escape, and nothing else sent.
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Ok(Fetched::Missing);
    }
    match stripe
        .get_uncached(&format!("/v1/subscriptions/{id}"), &[])
        .await
    {
        Ok((200, object)) if text(&object, "id") == Some(id) => Ok(Fetched::Object(object)),
        Ok((200, _)) => Err(failed(
            "an answer that is not the subscription asked for".into(),
        )),
        Ok((404, _)) => Ok(Fetched::Missing),
        // Our key is refused: a configuration error no retry of Stripe's will cure. Said
        // loudly, counted, and the event decided by the clocks alone.
        Ok((status @ (401 | 403), body)) => {
            let message = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)");
            tracing::error!(
                event = %event.id,
                status,
                message,
                "Stripe refuses STRIPE_API_KEY: fix it; meanwhile events in doubt are decided without Stripe's copy"
            );
            undecided(event, id, "api_key_refused");
            Ok(Fetched::Missing)
        }
        Ok((status, body)) => Err(failed(format!(
            "HTTP {status}: {}",
            body.pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
        ))),
        Err(cascade_core::upstream::UpstreamError::Unavailable { cause, .. }) => Err(failed(cause)),
    }
}

/// Counts an event in doubt decided without Stripe's copy (`reason`: `no_api_key`,
/// `api_key_refused`): as if Stripe had no such subscription.
fn undecided(event: &Event, subscription: &str, reason: &'static str) {
    metrics::counter!(STRIPE_WEBHOOKS, "outcome" => "decided_without_stripe", "reason" => reason)
        .increment(1);
    tracing::warn!(event = %event.id, subscription, reason, "Stripe event in doubt decided by the clocks alone: Stripe cannot be asked");
}

async fn attempt(
    db: &cascade_core::db::Db,
    config: &StripeConfig,
    event: &Event,
    fetched: &Fetched,
) -> Result<Attempt, ProcessError> {
    let mut conn = db.conn().await?;
    let tx = conn.transaction().await?;
    // Blocks while a concurrent delivery of the same event holds the key.
    let fresh = tx
        .execute(
            "INSERT INTO cascade_stripe_events (event_id, event_type, event_created) \
             VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING",
            &[&event.id, &event.kind, &event.created],
        )
        .await?;
    if fresh == 0 {
        return Ok(Attempt::Done(Outcome::Duplicate));
    }
    let object = &event.data.object;
    let effect = match (event.kind.as_str(), fetched) {
        (_, Fetched::Object(stripes)) => {
            subscription(&tx, config, event, stripes, true, true).await?
        }
        ("checkout.session.completed", _) => {
            Effect::Account(checkout_completed(&tx, event, object).await?)
        }
        ("invoice.paid", _) => invoice(&tx, event, object, "active", fetched).await?,
        ("invoice.payment_failed", _) => invoice(&tx, event, object, "past_due", fetched).await?,
        _ => {
            let decided = matches!(fetched, Fetched::Missing);
            subscription(&tx, config, event, object, false, decided).await?
        }
    };
    let user = match effect {
        Effect::InDoubt(subscription) => return Ok(Attempt::InDoubt(subscription)),
        Effect::Older => {
            tx.commit().await?;
            return Ok(Attempt::Done(Outcome::Older));
        }
        Effect::Account(user) => user,
    };
    let change = match user {
        Some(user_id) => retier(&tx, user_id).await?,
        None => None,
    };
    tx.commit().await?;
    Ok(Attempt::Done(Outcome::Applied(change)))
}

/// What a handler did inside the transaction.
enum Effect {
    /// Applied; the account whose tier must be recomputed, if one.
    Account(Option<i64>),
    /// Recorded without effect: the row's clocks are past the event's.
    Older,
    /// The clocks cannot order the event: subscription `.0` must be fetched from Stripe.
    InDoubt(String),
}

/// The subscription an event is about: the object of a subscription event, the invoice's
/// subscription, the checkout session's subscription.
pub fn subscription_of(event: &Event) -> Option<&str> {
    let object = &event.data.object;
    match event.kind.as_str() {
        "checkout.session.completed" => text(object, "subscription"),
        "invoice.paid" | "invoice.payment_failed" => invoice_subscription(object),
        kind if kind.starts_with("customer.subscription.") => text(object, "id"),
        _ => None,
    }
}

/// `subscription` on an invoice (older API versions) or under `parent` (newer).
fn invoice_subscription(object: &Value) -> Option<&str> {
    text(object, "subscription").or_else(|| {
        object
            .pointer("/parent/subscription_details/subscription")
            .and_then(Value::as_str)
    })
}

fn text<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn required<'a>(event: &Event, object: &'a Value, field: &str) -> Result<&'a str, ProcessError> {
    text(object, field).ok_or_else(|| ProcessError::Shape {
        event: event.id.clone(),
        message: format!("{} without {field}", event.kind),
    })
}

/// Locks the account `user_id` if it exists (so its tier is recomputed by one event at a time).
async fn lock_user(tx: &Transaction<'_>, user_id: i64) -> Result<Option<i64>, ProcessError> {
    Ok(tx
        .query_opt(
            "SELECT id FROM cascade_users WHERE id = $1 FOR UPDATE",
            &[&user_id],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The account of a Stripe object: its `metadata.cascade_user_id` (set at checkout), else
/// the account whose Stripe customer it is. Locked.
async fn owner(tx: &Transaction<'_>, object: &Value) -> Result<Option<i64>, ProcessError> {
    let from_metadata = object.pointer("/metadata/cascade_user_id").and_then(|v| {
        v.as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .or(v.as_i64())
    });
    if let Some(user_id) = from_metadata {
        return lock_user(tx, user_id).await;
    }
    let Some(customer) = text(object, "customer") else {
        return Ok(None);
    };
    let row = tx
        .query_opt(
            "SELECT id FROM cascade_users WHERE stripe_customer_id = $1 \
             ORDER BY id LIMIT 1 FOR UPDATE",
            &[&customer],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// `checkout.session.completed`: the account (`client_reference_id`) is linked to its Stripe
/// customer, and subscriptions of that customer seen before this event are attributed to it.
async fn checkout_completed(
    tx: &Transaction<'_>,
    event: &Event,
    object: &Value,
) -> Result<Option<i64>, ProcessError> {
    // Another product's checkout on the same Stripe account (a payment link, a one-off
    // payment) is acknowledged without effect: a 500 would have Stripe retry it for days.
    let Some(user_id) = text(object, "client_reference_id").and_then(|s| s.parse::<i64>().ok())
    else {
        tracing::warn!(event = %event.id, "checkout session without a Cascade account: no effect");
        return Ok(None);
    };
    if text(object, "mode").is_some_and(|mode| mode != "subscription") {
        tracing::warn!(event = %event.id, "checkout session not in subscription mode: no effect");
        return Ok(None);
    }
    let Some(customer) = text(object, "customer") else {
        tracing::warn!(event = %event.id, "checkout session without a customer: no effect");
        return Ok(None);
    };
    let Some(user_id) = lock_user(tx, user_id).await? else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE cascade_users SET stripe_customer_id = $2, updated_at = now() \
         WHERE id = $1 AND stripe_customer_id IS DISTINCT FROM $2",
        &[&user_id, &customer],
    )
    .await?;
    tx.execute(
        "UPDATE cascade_subscriptions SET user_id = $1, updated_at = now() \
         WHERE stripe_customer_id = $2 AND user_id IS NULL",
        &[&user_id, &customer],
    )
    .await?;
    Ok(Some(user_id))
}

/// A period bound of a subscription: on the object (API versions before 2025-03-31) or on its
/// first item (later versions).
fn period(object: &Value, field: &str) -> Option<i64> {
    object
        .get(field)
        .and_then(Value::as_i64)
        .or_else(|| object.pointer(&format!("/items/data/0/{field}"))?.as_i64())
}

/// `customer.subscription.*` (or Stripe's own copy of the subscription, `from_stripe`): the
/// subscription's object fields and status, each if this event is not older than what the row
/// has (see the module's ordering rule). `decided`: do not ask Stripe even if in doubt.
async fn subscription(
    tx: &Transaction<'_>,
    config: &StripeConfig,
    event: &Event,
    object: &Value,
    from_stripe: bool,
    decided: bool,
) -> Result<Effect, ProcessError> {
    let id = required(event, object, "id")?;
    let customer = text(object, "customer");
    let status = if event.kind == "customer.subscription.deleted" && !from_stripe {
        "canceled"
    } else {
        required(event, object, "status")?
    };
    let price = object
        .pointer("/items/data/0/price/id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let user_id = owner(tx, object).await?;
    let (start, end) = (
        period(object, "current_period_start"),
        period(object, "current_period_end"),
    );
    // The row as it is (the account is locked first: the order every handler locks in).
    let known = tx
        .query_opt(
            "SELECT (object_at = $2 AND (stripe_price_id IS DISTINCT FROM $3::text \
                        OR extract(epoch FROM current_period_start)::bigint IS DISTINCT FROM $4::bigint \
                        OR extract(epoch FROM current_period_end)::bigint IS DISTINCT FROM $5::bigint)) \
                    OR (status_at = $2 AND status <> 'canceled' AND status <> $6::text), \
                    object_at > $2 AND (status = 'canceled' OR status_at > $2 \
                        OR (status_at = $2 AND (status = $6::text \
                            OR cascade_status_rank($6::text) < cascade_status_rank(status)))) \
                    AND (user_id IS NOT NULL OR $7::bigint IS NULL) \
             FROM cascade_subscriptions WHERE stripe_subscription_id = $1 FOR UPDATE",
            &[&id, &event.created, &price, &start, &end, &status, &user_id],
        )
        .await?;
    if let Some(row) = known {
        let (in_doubt, older): (bool, bool) = (row.get(0), row.get(1));
        if in_doubt && !decided {
            return Ok(Effect::InDoubt(id.to_string()));
        }
        if older {
            return Ok(Effect::Older);
        }
    }
    let tier = match config.tier_of_price(price) {
        Some(tier) => tier,
        None => {
            metrics::counter!(STRIPE_WEBHOOKS, "outcome" => "unknown_price").increment(1);
            tracing::warn!(event = %event.id, price, "a subscription to a price STRIPE_PRICES_JSON does not name: it gives no paid tier");
            FREE_TIER
        }
    };
    tx.execute(
        "INSERT INTO cascade_subscriptions AS s \
             (user_id, stripe_subscription_id, stripe_customer_id, stripe_price_id, status, tier, \
              current_period_start, current_period_end, object_at, status_at) \
         VALUES ($1, $2, $3, $4, $5, $6, \
                 to_timestamp($7::bigint) AT TIME ZONE 'UTC', \
                 to_timestamp($8::bigint) AT TIME ZONE 'UTC', $9, $9) \
         ON CONFLICT (stripe_subscription_id) DO UPDATE SET \
             user_id = coalesce(s.user_id, EXCLUDED.user_id), \
             stripe_customer_id = coalesce(EXCLUDED.stripe_customer_id, s.stripe_customer_id), \
             stripe_price_id = CASE WHEN s.object_at <= EXCLUDED.object_at \
                                    THEN EXCLUDED.stripe_price_id ELSE s.stripe_price_id END, \
             tier = CASE WHEN s.object_at <= EXCLUDED.object_at \
                         THEN EXCLUDED.tier ELSE s.tier END, \
             current_period_start = CASE WHEN s.object_at <= EXCLUDED.object_at \
                 THEN EXCLUDED.current_period_start ELSE s.current_period_start END, \
             current_period_end = CASE WHEN s.object_at <= EXCLUDED.object_at \
                 THEN EXCLUDED.current_period_end ELSE s.current_period_end END, \
             object_at = greatest(s.object_at, EXCLUDED.object_at), \
             status = CASE WHEN s.status <> 'canceled' AND (s.status_at < EXCLUDED.status_at \
                                OR (s.status_at = EXCLUDED.status_at \
                                    AND ($10 OR cascade_status_rank(EXCLUDED.status) >= cascade_status_rank(s.status)))) \
                           THEN EXCLUDED.status ELSE s.status END, \
             status_at = greatest(s.status_at, EXCLUDED.status_at), \
             updated_at = now()",
        &[
            &user_id,
            &id,
            &customer,
            &price,
            &status,
            &tier,
            &start,
            &end,
            &event.created,
            &from_stripe,
        ],
    )
    .await?;
    // The row may have been attributed earlier (by checkout) than this event can tell.
    let row = tx
        .query_one(
            "SELECT user_id FROM cascade_subscriptions WHERE stripe_subscription_id = $1",
            &[&id],
        )
        .await?;
    let attributed: Option<i64> = row.get(0);
    Ok(Effect::Account(match (user_id, attributed) {
        (Some(user_id), _) => Some(user_id),
        (None, Some(user_id)) => lock_user(tx, user_id).await?,
        (None, None) => None,
    }))
}

/// `invoice.paid` / `invoice.payment_failed`: the status of the invoice's subscription, if
/// this event is not older than the row's status. An invoice for a subscription this database
/// has never seen is in doubt: Stripe's copy of the subscription is fetched and applied
/// instead (none at Stripe: no effect).
async fn invoice(
    tx: &Transaction<'_>,
    event: &Event,
    object: &Value,
    status: &str,
    fetched: &Fetched,
) -> Result<Effect, ProcessError> {
    let Some(subscription) = invoice_subscription(object) else {
        return Ok(Effect::Account(None));
    };
    let row = tx
        .query_opt(
            "SELECT user_id FROM cascade_subscriptions WHERE stripe_subscription_id = $1",
            &[&subscription],
        )
        .await?;
    let Some(row) = row else {
        return Ok(match fetched {
            Fetched::No => Effect::InDoubt(subscription.to_string()),
            _ => Effect::Account(None),
        });
    };
    // The account first, then the row: the order every handler locks in.
    let seen: Option<i64> = row.get(0);
    let mut user_id = match seen {
        Some(user_id) => lock_user(tx, user_id).await?,
        None => None,
    };
    // Read again under the row's lock: a checkout committed meanwhile may have attributed it
    // (`user_id` only ever goes from none to an account), and that account's tier must follow.
    let now: Option<i64> = tx
        .query_one(
            "SELECT user_id FROM cascade_subscriptions WHERE stripe_subscription_id = $1 \
             FOR UPDATE",
            &[&subscription],
        )
        .await?
        .get(0);
    if now != seen
        && let Some(attributed) = now
    {
        user_id = lock_user(tx, attributed).await?;
    }
    let changed = tx
        .query_opt(
            // Strictly newer only: an invoice event in the same second as a subscription event
            // (Stripe's `created` is in seconds) must not undo it (an `unpaid` back to
            // `past_due`). A failed payment makes only a paying subscription `past_due`: a
            // first payment that fails leaves an `incomplete` one without a tier.
            "WITH row AS (SELECT status, status_at FROM cascade_subscriptions \
                          WHERE stripe_subscription_id = $1 FOR UPDATE), \
                  moved AS (UPDATE cascade_subscriptions \
                            SET status = $2, status_at = $3, updated_at = now() \
                            WHERE stripe_subscription_id = $1 AND status <> 'canceled' \
                              AND status_at < $3 \
                              AND ($2 <> 'past_due' OR status IN ('active', 'trialing', 'past_due')) \
                            RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM moved), \
                    (SELECT status = 'canceled' OR status_at >= $3 FROM row)",
            &[&subscription, &status, &event.created],
        )
        .await?;
    let (moved, older) = changed
        .map(|row| (row.get::<_, bool>(0), row.get::<_, Option<bool>>(1)))
        .unwrap_or((false, None));
    if !moved && older == Some(true) {
        return Ok(Effect::Older);
    }
    Ok(Effect::Account(user_id))
}

/// Recomputes the account's tier from its subscriptions (the account row is locked): the
/// most recent entitling subscription with a paid tier; one whose price `STRIPE_PRICES_JSON`
/// does not name gives no tier and never hides a paid one.
async fn retier(tx: &Transaction<'_>, user_id: i64) -> Result<Option<TierChange>, ProcessError> {
    let row = tx
        .query_one(
            "SELECT u.subscription_tier, \
                    (SELECT s.tier FROM cascade_subscriptions s \
                     WHERE s.user_id = u.id AND s.status = ANY($2) \
                     ORDER BY s.tier <> $3 DESC, s.object_at DESC, s.id DESC LIMIT 1), \
                    (SELECT s.status FROM cascade_subscriptions s WHERE s.user_id = u.id \
                     ORDER BY s.status_at DESC, s.id DESC LIMIT 1) \
             FROM cascade_users u WHERE u.id = $1",
            &[&user_id, &ENTITLED, &FREE_TIER],
        )
        .await?;
    let from: String = row.get(0);
    let to: String = row
        .get::<_, Option<String>>(1)
        .unwrap_or_else(|| FREE_TIER.to_string());
    let status: Option<String> = row.get(2);
    tx.execute(
        "UPDATE cascade_users SET subscription_tier = $2, subscription_status = $3, \
                updated_at = now() \
         WHERE id = $1 AND (subscription_tier, coalesce(subscription_status, '')) \
                           IS DISTINCT FROM ($2, coalesce($3, ''))",
        &[&user_id, &to, &status],
    )
    .await?;
    Ok((from != to).then_some(TierChange { user_id, from, to }))
}
