//! Reconciliation: a webhook Stripe gave up on (three days of failed retries, a lost secret)
//! would leave a subscription wrong for good. So, every `STRIPE_RECONCILE_INTERVAL`, one
//! instance of the cluster lists Stripe's events created since the last run
//! (`GET /v1/events?created[gte]=…&types[]=…`, 100 a page, paging while `has_more`) through the
//! `stripe` connector and feeds each, oldest first, through the webhook's own
//! [`apply`](super::webhook::apply): its dedupe row makes an event already delivered a free
//! no-op, and its ordering rule makes the order of arrival irrelevant, so a run changes exactly
//! what the lost deliveries would have.
//!
//! The cursor (`cascade_stripe_reconcile`, one row) is the newest `created` seen minus
//! [`OVERLAP`]: an event Stripe records late within the same seconds is still listed next time.
//! A run holds that row locked (`FOR UPDATE SKIP LOCKED`): an instance that finds it locked
//! skips its turn, so a run happens once cluster-wide. A failed run leaves the cursor where it
//! was; the next run lists the same events again. An event whose subscription cannot be
//! fetched (in doubt, Stripe not answering for it) does not fail the run: the others are
//! applied, it is reported (`unfetched`), and the cursor is held at or before its `created`
//! minus [`OVERLAP`] so the next run retries it.

use std::time::Duration;

use cascade_core::db::{Db, DbError};
use cascade_core::shutdown::ShutdownSignal;
use cascade_core::upstream::{Connector, UpstreamError};
use serde::Deserialize;
use serde_json::Value;

use super::webhook::{Event, Outcome, ProcessError, TierChange, apply, subscription_of};
use crate::AppModuleState;

/// Events applied by reconciliation, by `outcome`: `applied` (a delivery had been lost),
/// `duplicate` (already applied by its webhook), `older` (recorded, its subscription already
/// newer), `ignored`, `failed` (malformed: logged), `unfetched` (in doubt and Stripe did not
/// give its subscription: retried by the next run).
pub const STRIPE_RECONCILED: &str = "cascade_stripe_reconciled_total";

/// Reconciliation runs by `result`: `ok`, `partial` (some events could not be applied yet:
/// their subscription could not be fetched), `skipped` (another instance was running),
/// `error`.
pub const STRIPE_RECONCILE_RUNS: &str = "cascade_stripe_reconcile_runs_total";

/// How far before the newest event seen the next run starts listing.
pub const OVERLAP: i64 = 60;

/// Events per page (Stripe's maximum).
const PAGE: &str = "100";

/// The event types listed: those [`apply`] handles.
const TYPES: &[&str] = &[
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
];

/// A bound on pages per run (100 000 events), so a misbehaving listing cannot loop forever.
const MAX_PAGES: usize = 1000;

pub fn describe_metrics() {
    metrics::describe_counter!(
        STRIPE_RECONCILED,
        "Stripe events applied by reconciliation, by outcome (applied, duplicate, older, ignored, failed, unfetched)"
    );
    metrics::describe_counter!(
        STRIPE_RECONCILE_RUNS,
        "Stripe reconciliation runs by result (ok, partial, skipped, error)"
    );
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// False when another instance held the run: nothing was listed.
    pub ran: bool,
    /// Events listed by Stripe.
    pub listed: usize,
    /// Events whose effect this run committed (their webhooks had been lost).
    pub applied: Vec<String>,
    /// Events already applied before.
    pub duplicates: usize,
    /// Events recorded without effect: their subscription already held newer state.
    pub older: usize,
    /// Malformed events (logged; a webhook delivery of them fails the same way).
    pub failed: Vec<String>,
    /// Events in doubt whose subscription Stripe did not give (logged, counted as
    /// `unfetched`): not applied; the cursor stays before them so the next run retries them.
    pub unfetched: Vec<String>,
    /// Accounts whose tier this run changed.
    pub tier_changes: Vec<TierChange>,
    /// Subscriptions whose status or tier this run changed, in the order first touched.
    pub repaired: Vec<Repair>,
    /// The cursor the next run starts from.
    pub cursor: i64,
}

/// A subscription's status and tier.
pub type StatusTier = (String, String);

/// A subscription a run changed: its status and tier before (`None`: unknown here) and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub subscription: String,
    pub user_id: Option<i64>,
    pub before: Option<StatusTier>,
    pub after: StatusTier,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("billing is not configured (STRIPE_API_KEY is not set)")]
    NotConfigured,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("Stripe: {0}")]
    Stripe(String),
}

impl From<tokio_postgres::Error> for ReconcileError {
    fn from(err: tokio_postgres::Error) -> Self {
        ReconcileError::Db(DbError::from(err))
    }
}

/// A page of `GET /v1/events`.
#[derive(Debug, Deserialize)]
struct Page {
    data: Vec<Value>,
    has_more: bool,
}

/// The background task: a run every `every`, the first one `every` after startup.
pub async fn run(state: AppModuleState, every: Duration, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.recv() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            () = stop.recv() => return,
            result = reconcile_once(&state) => log(&result),
        }
    }
}

fn log(result: &Result<Report, Interrupted>) {
    match result {
        Ok(report) if !report.ran => {}
        Ok(report)
            if report.applied.is_empty()
                && report.failed.is_empty()
                && report.unfetched.is_empty() =>
        {
            tracing::debug!(
                listed = report.listed,
                "Stripe reconciliation: nothing to repair"
            )
        }
        Ok(report) => tracing::warn!(
            listed = report.listed,
            applied = report.applied.len(),
            failed = report.failed.len(),
            unfetched = report.unfetched.len(),
            tier_changes = report.tier_changes.len(),
            "Stripe reconciliation applied events whose webhooks were lost: {:?}",
            report.applied
        ),
        Err(err) => tracing::warn!(
            error = %err.error,
            applied = err.partial.applied.len(),
            "Stripe reconciliation failed; the next run retries: {:?}",
            err.partial.applied
        ),
    }
}

/// A run that stopped on an error: what it had applied by then (committed: each event is its
/// own transaction) is in `partial`; the cursor did not move.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Interrupted {
    pub error: ReconcileError,
    pub partial: Report,
}

/// One run (see the module): lists, applies, announces tier changes, moves the cursor.
pub async fn reconcile_once(state: &AppModuleState) -> Result<Report, Interrupted> {
    let mut report = Report::default();
    let result = match reconcile(state, &mut report).await {
        Ok(()) => Ok(report),
        Err(error) => Err(Interrupted {
            error,
            partial: report,
        }),
    };
    let label = match &result {
        Ok(report) if report.ran && !report.unfetched.is_empty() => "partial",
        Ok(report) if report.ran => "ok",
        Ok(_) => "skipped",
        Err(_) => "error",
    };
    metrics::counter!(STRIPE_RECONCILE_RUNS, "result" => label).increment(1);
    result
}

async fn reconcile(state: &AppModuleState, report: &mut Report) -> Result<(), ReconcileError> {
    if state.config.stripe.api_key.is_none() {
        return Err(ReconcileError::NotConfigured);
    }
    let db: &Db = &state.app.db;
    // The run's lock: held by this transaction until the cursor is written.
    let mut conn = db.conn().await?;
    let tx = conn.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT cursor FROM cascade_stripe_reconcile FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await?
    else {
        return Ok(());
    };
    let since: i64 = row.get(0);
    let events = list_since(&state.stripe, since).await?;
    *report = Report {
        ran: true,
        listed: events.len(),
        cursor: since,
        ..Report::default()
    };
    // Status and tier of each subscription the events name, before its first event.
    // (subscription, before, whether an applied event touched it)
    let mut touched: Vec<(String, Option<StatusTier>, bool)> = Vec::new();
    // The cursor may not pass an event that could not be applied yet.
    let mut hold: Option<i64> = None;
    for event in events.iter().rev() {
        report.cursor = report.cursor.max(event.created - OVERLAP);
        let subject = subscription_of(event).map(str::to_string);
        if let Some(id) = &subject
            && !touched.iter().any(|(known, _, _)| known == id)
        {
            let before = snapshot(&tx, id).await?.map(|(_, state)| state);
            touched.push((id.clone(), before, false));
        }
        let outcome = match apply(state, event).await {
            Ok(outcome) => outcome,
            Err(ProcessError::Db(err)) => return Err(err.into()),
            Err(err @ ProcessError::Stripe { .. }) => {
                // One subscription Stripe will not give must not stop every run for good:
                // the others are applied, this one is retried from the held cursor.
                metrics::counter!(STRIPE_RECONCILED, "outcome" => "unfetched").increment(1);
                tracing::error!(event = %event.id, error = %err, "Stripe reconciliation: event not applied (its subscription could not be fetched); the next run retries it");
                report.unfetched.push(event.id.clone());
                let before = event.created - OVERLAP;
                hold = Some(hold.map_or(before, |held| held.min(before)));
                continue;
            }
            Err(err) => {
                metrics::counter!(STRIPE_RECONCILED, "outcome" => "failed").increment(1);
                tracing::error!(event = %event.id, error = %err, "Stripe reconciliation: event not applicable");
                report.failed.push(event.id.clone());
                continue;
            }
        };
        let label = match &outcome {
            Outcome::Applied(change) => {
                report.applied.push(event.id.clone());
                if let Some(entry) = touched
                    .iter_mut()
                    .find(|(id, _, _)| Some(id) == subject.as_ref())
                {
                    entry.2 = true;
                }
                if let Some(change) = change {
                    super::webhook::announce(state, change).await;
                    report.tier_changes.push(change.clone());
                }
                "applied"
            }
            Outcome::Duplicate => {
                report.duplicates += 1;
                "duplicate"
            }
            Outcome::Older => {
                report.older += 1;
                "older"
            }
            Outcome::Ignored => "ignored",
        };
        metrics::counter!(STRIPE_RECONCILED, "outcome" => label).increment(1);
    }
    if let Some(held) = hold {
        report.cursor = report.cursor.min(held);
    }
    for (subscription, before, applied) in touched {
        if !applied {
            continue;
        }
        if let Some((user_id, after)) = snapshot(&tx, &subscription).await?
            && before.as_ref() != Some(&after)
        {
            report.repaired.push(Repair {
                subscription,
                user_id,
                before,
                after,
            });
        }
    }
    tx.execute(
        "UPDATE cascade_stripe_reconcile SET cursor = $1, finished_at = now()",
        &[&report.cursor],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The account, status and tier of subscription `id`, if this database has it.
async fn snapshot(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
) -> Result<Option<(Option<i64>, StatusTier)>, ReconcileError> {
    Ok(tx
        .query_opt(
            "SELECT user_id, status, tier FROM cascade_subscriptions \
             WHERE stripe_subscription_id = $1",
            &[&id],
        )
        .await?
        .map(|row| (row.get(0), (row.get(1), row.get(2)))))
}

/// Every handled event created at or after `since`, newest first (Stripe's order).
async fn list_since(stripe: &Connector, since: i64) -> Result<Vec<Event>, ReconcileError> {
    let since = since.to_string();
    let mut events: Vec<Event> = Vec::new();
    for _ in 0..MAX_PAGES {
        let mut query = vec![("created[gte]", since.as_str()), ("limit", PAGE)];
        query.extend(TYPES.iter().map(|kind| ("types[]", *kind)));
        if let Some(last) = events.last() {
            query.push(("starting_after", last.id.as_str()));
        }
        let page = page(stripe, &query).await?;
        let more = page.has_more && !page.data.is_empty();
        for object in page.data {
            let event: Event = serde_json::from_value(object)
                .map_err(|err| ReconcileError::Stripe(format!("an event we cannot read: {err}")))?;
            events.push(event);
        }
        if !more {
            return Ok(events);
        }
    }
    Err(ReconcileError::Stripe(format!(
        "more than {MAX_PAGES} pages of events"
    )))
}

async fn page(stripe: &Connector, query: &[(&str, &str)]) -> Result<Page, ReconcileError> {
    match stripe.get_uncached("/v1/events", query).await {
        Ok((200, body)) => serde_json::from_value(body)
            .map_err(|err| ReconcileError::Stripe(format!("an events page we cannot read: {err}"))),
        Ok((status, body)) => Err(ReconcileError::Stripe(format!(
            "GET /v1/events: HTTP {status}: {}",
            body.pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
        ))),
        Err(UpstreamError::Unavailable { cause, .. }) => Err(ReconcileError::Stripe(cause)),
    }
}
