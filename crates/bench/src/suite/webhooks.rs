//! Stripe webhook ingestion: signed `customer.subscription.updated` events posted to
//! `POST /webhooks/stripe` by one client per connection, spread over 1000 subscriptions of the
//! suite's accounts, each event a price change (so most move a tier: the row upsert, the
//! account's tier recomputed, its sessions invalidated on every instance, `tier_changed`
//! published), signed at send time as Stripe signs them.
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
//! Checked: every answer is a 200 whose `outcome` is the one expected (`applied`, or
//! `duplicate` for a repeat; a repeat still in flight may see either order, so a duplicate
//! pair must be one `applied` and one `duplicate`), and at the end each event id is recorded
//! once. A wrong answer is counted as an error; a doubled id fails the suite.

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

const SUBSCRIPTIONS: usize = 1000;

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
    let mut rows = Vec::new();
    let (row, _) = measure(suite, &users, "mixed", Mix::TenPercentDuplicates, 0).await?;
    rows.push(row);
    let (row, sent) = measure(suite, &users, "new", Mix::AllNew, 0).await?;
    rows.push(row);
    let (row, _) = measure(suite, &users, "new", Mix::AllDuplicates, sent).await?;
    rows.push(row);
    let doubled: i64 = sql
        .query_one(
            "SELECT count(*) FROM (SELECT event_id FROM cascade_stripe_events \
             GROUP BY event_id HAVING count(*) > 1) d",
            &[],
        )
        .await?
        .get(0);
    ensure!(doubled == 0, "{doubled} Stripe event ids recorded twice");
    rows.push(dedupe_insert(suite, &sql).await?);
    Ok(rows)
}

/// The event at position `position` of a run named `run`: a price change of one of the
/// subscriptions, its `created` one second after the previous position's.
fn event(run: &str, position: usize, users: &[i64], base: i64) -> String {
    let sub = position % SUBSCRIPTIONS;
    let user = users[sub % users.len()];
    let price = if (position / SUBSCRIPTIONS).is_multiple_of(2) {
        "price_architect"
    } else {
        "price_explorer"
    };
    json!({
        "id": format!("evt_bench_{run}_{position}"), "object": "event", "type": "customer.subscription.updated",
        "created": base + position as i64, "livemode": false,
        "data": { "object": {
            "id": format!("sub_bench_{run}_{sub}"), "object": "subscription",
            "customer": format!("cus_bench_{sub}"), "status": "active",
            "metadata": { "cascade_user_id": user.to_string() },
            "items": { "data": [ { "price": { "id": price },
                "current_period_start": base, "current_period_end": base + 30 * 86_400 } ] },
        } },
    })
    .to_string()
}

/// One run for the suite's seconds (or, for [`Mix::AllDuplicates`], until the `replay`
/// positions are spent): its row and how many positions it sent.
async fn measure(
    suite: &Suite,
    users: &Arc<Vec<i64>>,
    run: &'static str,
    mix: Mix,
    replay: usize,
) -> anyhow::Result<(Row, usize)> {
    let clients = suite.wrk.connections.max(2);
    let http =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))?;
    let url = format!("{}/webhooks/stripe", suite.wrk.base);
    let base = unix_now() - 10 * 86_400;
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
                let body = event(run, source, &users, base);
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
                    Some("applied") => applied.fetch_add(1, Ordering::Relaxed),
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
    // A run stopped mid-flight may leave a repeat's original unsent: allow that many.
    let expected_duplicates = match mix {
        Mix::TenPercentDuplicates => sent as u64 / 10,
        Mix::AllNew => 0,
        Mix::AllDuplicates => sent as u64,
    };
    let mut errors = errors.load(Ordering::Relaxed);
    if duplicates.abs_diff(expected_duplicates) > clients as u64 {
        errors += duplicates.abs_diff(expected_duplicates);
    }
    let (scenario, what) = match mix {
        Mix::TenPercentDuplicates => (
            "stripe webhooks: signed events, 10 % duplicates",
            "every 10th delivery repeats one sent 5 before (often concurrently)",
        ),
        Mix::AllNew => (
            "stripe webhooks: all new (effect + dedupe)",
            "each a price change: upsert, tier recomputed, sessions invalidated",
        ),
        Mix::AllDuplicates => (
            "stripe webhooks: all duplicates (dedupe only)",
            "the all-new run's events again: verify, parse, the dedupe insert finds the id",
        ),
    };
    let notes = format!(
        "{clients} clients, {SUBSCRIPTIONS} subscriptions: {applied} applied, {duplicates} \
         duplicate; {what}; events/s = req/s"
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
