//! Stripe webhook ingestion: signed `customer.subscription.updated` events posted to
//! `POST /webhooks/stripe` by one client per connection, for one subscription per account of
//! the suite, each event a price change that alternates for its account (explorer, architect,
//! explorer, …) with a `created` one second after the previous event's, so every new event
//! moves its account's tier: the row upsert, the tier recomputed under the account's lock, its
//! sessions invalidated on every instance, `tier_changed` published. Signed at send time, as
//! Stripe signs them.
//!
//! Three runs, so a reader sees what exactly-once costs:
//! - **10 % duplicates** (the issue's figure): every tenth delivery repeats the event sent five
//!   positions before (often still in flight: a concurrent duplicate);
//! - **all new**: no duplicate;
//! - **all duplicates**: the all-new run's events again: verified, parsed, the dedupe insert
//!   finds the id, nothing else. Its throughput against all-new is the dedupe path's share.
//!
//! And the dedupe's own statement alone: `BEGIN; INSERT INTO cascade_stripe_events … ON
//! CONFLICT DO NOTHING; COMMIT` of new ids from one connection, straight to PostgreSQL.
//!
//! Checked: every answer is a 200; the events answered `applied` (or `older`: an account's
//! two events in flight at once may arrive in either order) are exactly the distinct ids the
//! run sent, the rest `duplicate` (a wrong count is counted as errors); and after the all-new
//! run every account has the tier of the last event sent for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cascade_testkit::stripe::{signature_header, unix_now};
use serde_json::{Value, json};

use super::Suite;
use super::report::Row;

/// The webhook secret and prices the suite's server is started with.
pub const SECRET: &str = "whsec_cascade_bench";
pub const PRICES: &str = r#"{"explorer":"price_explorer","architect":"price_architect"}"#;

/// How a run picks the event of each delivery position.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Every tenth position repeats position − 5.
    TenPercentDuplicates,
    AllNew,
    /// Positions of the all-new run again, in order, while they last.
    AllDuplicates,
}

pub(super) async fn run(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    let sql = super::spaces::connect(&suite.pg.url()).await?;
    let users: Vec<i64> = sql
        .query(
            "SELECT id FROM cascade_users WHERE username <> $1 ORDER BY id",
            &[&super::BENCH_ACCOUNT],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    ensure!(
        !users.is_empty(),
        "no accounts for the subscriptions' owners"
    );
    let users = Arc::new(users);
    // Positions are global across runs (ids, `created`, the price alternation); each run
    // starts on a whole round of the accounts.
    let round = 2 * users.len();
    let next_offset = |offset: usize, sent: usize| (offset + sent).div_ceil(round) * round;
    let base = unix_now() - 30 * 86_400;
    let mut rows = Vec::new();
    let (row, sent) = measure(suite, &users, Mix::TenPercentDuplicates, base, 0, 0).await?;
    rows.push(row);
    let offset = next_offset(0, sent);
    let (row, sent) = measure(suite, &users, Mix::AllNew, base, offset, 0).await?;
    rows.push(row);
    // The all-new run moved every account's tier to its last event's price.
    let mut wrong = 0;
    for (index, user) in users.iter().enumerate() {
        let Some(last) = (offset..offset + sent)
            .rev()
            .find(|g| g % users.len() == index)
        else {
            continue;
        };
        let tier: String = sql
            .query_one(
                "SELECT subscription_tier FROM cascade_users WHERE id = $1",
                &[user],
            )
            .await?
            .get(0);
        if format!("price_{tier}") != price(last, users.len()) {
            wrong += 1;
        }
    }
    ensure!(
        wrong == 0,
        "{wrong} accounts without the tier of their last event"
    );
    let (row, _) = measure(suite, &users, Mix::AllDuplicates, base, offset, sent).await?;
    rows.push(row);
    rows.push(dedupe_insert(suite, &sql).await?);
    Ok(rows)
}

/// The price of the event at global position `g`: the account's `g / accounts`-th event,
/// alternating.
fn price(g: usize, accounts: usize) -> &'static str {
    if (g / accounts).is_multiple_of(2) {
        "price_explorer"
    } else {
        "price_architect"
    }
}

/// The event at global position `g`: a price change of account `g % accounts`'s subscription,
/// `created` `g` seconds after `base`.
fn event(g: usize, users: &[i64], base: i64) -> String {
    let index = g % users.len();
    let user = users[index];
    json!({
        "id": format!("evt_bench_{g}"), "object": "event", "type": "customer.subscription.updated",
        "created": base + g as i64, "livemode": false,
        "data": { "object": {
            "id": format!("sub_bench_{index}"), "object": "subscription",
            "customer": format!("cus_bench_{index}"), "status": "active",
            "metadata": { "cascade_user_id": user.to_string() },
            "items": { "data": [ { "price": { "id": price(g, users.len()) },
                "current_period_start": base, "current_period_end": base + 30 * 86_400 } ] },
        } },
    })
    .to_string()
}

/// One run for the suite's seconds (or, for [`Mix::AllDuplicates`], until the `replay`
/// positions are spent), its positions starting at global position `offset`: its row and how
/// many positions it sent.
async fn measure(
    suite: &Suite,
    users: &Arc<Vec<i64>>,
    mix: Mix,
    base: i64,
    offset: usize,
    replay: usize,
) -> anyhow::Result<(Row, usize)> {
    let clients = suite.wrk.connections.max(2);
    let http =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))?;
    let url = format!("{}/webhooks/stripe", suite.wrk.base);
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (applied, duplicates, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, users, next, stop) = (
            http.clone(),
            url.clone(),
            users.clone(),
            next.clone(),
            stop.clone(),
        );
        let (applied, duplicates, errors) = (applied.clone(), duplicates.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let position = next.fetch_add(1, Ordering::Relaxed);
                let source = match mix {
                    Mix::TenPercentDuplicates if position % 10 == 9 => position - 5,
                    Mix::AllDuplicates if position >= replay => break,
                    _ => position,
                };
                let body = event(offset + source, &users, base);
                let header = signature_header(&[SECRET], unix_now(), body.as_bytes());
                let begun = Instant::now();
                let answer = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("stripe-signature", header)
                    .body(body)
                    .send()
                    .await;
                let outcome = match answer {
                    Ok(response) if response.status() == 200 => response
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["outcome"].as_str().map(str::to_string)),
                    _ => None,
                };
                latencies.push(begun.elapsed());
                match outcome.as_deref() {
                    Some("applied" | "older") => applied.fetch_add(1, Ordering::Relaxed),
                    Some("duplicate") => duplicates.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            latencies
        }));
    }
    if mix != Mix::AllDuplicates {
        tokio::time::sleep(Duration::from_secs(suite.wrk.seconds)).await;
        stop.store(true, Ordering::Relaxed);
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("a webhook client")?);
    }
    let elapsed = started.elapsed();
    let sent = latencies.len();
    let (applied, duplicates) = (
        applied.load(Ordering::Relaxed),
        duplicates.load(Ordering::Relaxed),
    );
    // Positions 0..sent were all sent (each claimed position is); their distinct ids must be
    // the events applied (a repeat whose original was never sent is applied itself), the
    // rest duplicates.
    let distinct = match mix {
        Mix::TenPercentDuplicates => (0..sent).filter(|p| p % 10 != 9).count() as u64,
        Mix::AllNew => sent as u64,
        Mix::AllDuplicates => 0,
    };
    let mut errors = errors.load(Ordering::Relaxed);
    errors += applied.abs_diff(distinct) + (applied + duplicates).abs_diff(sent as u64);
    let (scenario, what) = match mix {
        Mix::TenPercentDuplicates => (
            "stripe webhooks: signed events, 10 % duplicates",
            "every 10th delivery repeats one sent 5 before (often concurrently)",
        ),
        Mix::AllNew => (
            "stripe webhooks: all new (effect + dedupe)",
            "each a price change that moves its account's tier: upsert, tier recomputed, \
             sessions invalidated, tier_changed published",
        ),
        Mix::AllDuplicates => (
            "stripe webhooks: all duplicates (dedupe only)",
            "the all-new run's events again: verify, parse, the dedupe insert finds the id",
        ),
    };
    let notes = format!(
        "{clients} clients, {} subscriptions (one per account): {applied} applied, \
         {duplicates} duplicate; {what}; events/s = req/s",
        users.len()
    );
    Ok((
        Row::from_latencies(scenario.to_string(), &mut latencies, elapsed, errors, notes),
        sent,
    ))
}

/// The dedupe's statement alone, in its own transaction, from one connection.
async fn dedupe_insert(suite: &Suite, sql: &tokio_postgres::Client) -> anyhow::Result<Row> {
    let count = if suite.quick { 500 } else { 5000 };
    let statement = sql
        .prepare(
            "INSERT INTO cascade_stripe_events (event_id, event_type, event_created) \
             VALUES ($1, 'customer.subscription.updated', $2) ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let id = format!("evt_bench_dedupe_{i}");
        let begun = Instant::now();
        sql.batch_execute("BEGIN").await?;
        sql.execute(&statement, &[&id, &(i as i64)]).await?;
        sql.batch_execute("COMMIT").await?;
        latencies.push(begun.elapsed());
    }
    let elapsed = started.elapsed();
    Ok(Row::from_latencies(
        "stripe webhooks: the dedupe insert alone (SQL)".to_string(),
        &mut latencies,
        elapsed,
        0,
        "BEGIN; INSERT … ON CONFLICT DO NOTHING; COMMIT of new ids, one connection, \
         sequential: a lower bound of what exactly-once adds per event"
            .to_string(),
    ))
}
