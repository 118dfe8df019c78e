//! The cold-key stampede: many concurrent requests for one key nobody has read. The cache's
//! lease must let exactly one of them load it; PostgreSQL's own count of the asset lookup (by
//! its tag) says how many did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Suite;
use super::report::Row;
use crate::statements;

pub(super) async fn run(suite: &Suite) -> anyhow::Result<Row> {
    let n = if suite.quick { 200 } else { 1000 };
    let client = &suite.client;
    // The last asset may have been cached by the miss-heavy walk; a write drops it everywhere.
    let id = suite.ids.last().expect("seeded ids").clone();
    client.invalidate_asset(&id).await?;
    let loads_before = client.cache_counter("assets", "loads").await?;
    let lookups_before = suite.calls(statements::ASSETS).await?;
    let started = Instant::now();
    let (mut latencies, errors) = concurrent_gets(suite, &format!("/listings/{id}"), n).await?;
    let elapsed = started.elapsed();
    let loads = client
        .cache_counter("assets", "loads")
        .await?
        .saturating_sub(loads_before);
    let lookups = suite.calls(statements::ASSETS).await?;
    let notes = match lookups_before.zip(lookups) {
        Some((before, after)) => {
            let queries = after.saturating_sub(before);
            format!(
                "{queries} PostgreSQL {} for {n} requests (pg_stat_statements; {loads} cache load(s))",
                if queries == 1 { "query" } else { "queries" }
            )
        }
        None => format!("{loads} PostgreSQL load(s) for {n} requests"),
    };
    Ok(Row::from_latencies(
        format!("cold-key stampede ({n} concurrent)"),
        &mut latencies,
        elapsed,
        errors,
        notes,
    ))
}

/// `n` GETs of `path` released together; each one's latency, and how many failed.
async fn concurrent_gets(
    suite: &Suite,
    path: &str,
    n: usize,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, barrier, path) = (suite.client.clone(), barrier.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let begun = Instant::now();
            let ok = client.get_ok(&path).await.is_ok();
            (ok, begun.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    let mut errors = 0;
    for task in tasks {
        let (ok, latency) = task.await?;
        errors += u64::from(!ok);
        latencies.push(latency);
    }
    Ok((latencies, errors))
}
