//! PostgreSQL stopped under load, then started again: reads of cached keys must go on,
//! writes must be refused fast (503 within the pool's acquire timeout, not hang), no
//! acknowledged write may be missing afterwards, and writes must come back by themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cascade_core::db::EmbeddedPostgres;
use serde_json::json;

use super::Suite;
use super::client::Client;
use super::report::Row;

/// Concurrent readers of the cached hot set.
const READERS: usize = 8;

/// What the readers saw.
#[derive(Default)]
struct Reads {
    ok: u64,
    failed: u64,
    latencies: Vec<Duration>,
}

/// What the writer saw.
#[derive(Default)]
struct Writes {
    /// The last acknowledged version: PostgreSQL must hold it afterwards.
    acked: u64,
    /// Answered 503, as a write must be while PostgreSQL is away.
    refused: u64,
    /// Any other failure (another status, or no answer).
    other: u64,
    slowest_refusal: Duration,
    /// The first acknowledgement after the last refusal.
    back_at: Option<Instant>,
}

pub(super) async fn run(suite: &mut Suite) -> anyhow::Result<Row> {
    let down = suite.outage();
    let target = suite.hot[1].clone();
    // Readers read the other hot keys: the written one is invalidated by every acknowledged
    // write, so while PostgreSQL is down it can only be refused (that is the writer's count).
    let readable: Vec<String> = suite
        .hot
        .iter()
        .filter(|h| **h != target)
        .cloned()
        .collect();
    // The statement counter's connection would not survive the stop; nothing counts here.
    suite.statements = None;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            tokio::spawn(read(
                suite.client.clone(),
                readable.clone(),
                r,
                stop.clone(),
            ))
        })
        .collect();
    let writer = tokio::spawn(write(suite.client.clone(), target.clone(), stop.clone()));

    tokio::time::sleep(down / 2).await;
    tokio::task::block_in_place(|| suite.pg.stop());
    tokio::time::sleep(down).await;
    suite.pg = EmbeddedPostgres::start(&suite.pg_dir, Duration::from_secs(60)).await?;
    let restarted = Instant::now();
    tokio::time::sleep(down / 2 + Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut reads = Reads::default();
    for reader in readers {
        let r = reader.await?;
        reads.ok += r.ok;
        reads.failed += r.failed;
        reads.latencies.extend(r.latencies);
    }
    let writes = writer.await?;
    let lost = writes
        .acked
        .saturating_sub(stored_version(&suite.pg, &target).await?);
    let notes = format!(
        "reads {} ok, {} failed; writes refused with 503: {} (slowest {} ms), other errors: {}; acknowledged writes lost: {lost}; writes back {} after PostgreSQL returned",
        reads.ok,
        reads.failed,
        writes.refused,
        writes.slowest_refusal.as_millis(),
        writes.other,
        match writes.back_at {
            Some(at) => format!("{} ms", at.saturating_duration_since(restarted).as_millis()),
            None if writes.refused == 0 => "(never refused)".into(),
            None => "not before the end".into(),
        }
    );
    Ok(Row::from_latencies(
        format!("PostgreSQL stopped for {}s under load", down.as_secs()),
        &mut reads.latencies,
        started.elapsed(),
        reads.failed + writes.other,
        notes,
    ))
}

/// Reads `hot` round-robin until told to stop.
async fn read(client: Client, hot: Vec<String>, first: usize, stop: Arc<AtomicBool>) -> Reads {
    let mut reads = Reads::default();
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let begun = Instant::now();
        match client
            .get_ok(&format!("/listings/{}", hot[i % hot.len()]))
            .await
        {
            Ok(_) => reads.ok += 1,
            Err(_) => reads.failed += 1,
        }
        reads.latencies.push(begun.elapsed());
    }
    reads
}

/// Writes increasing versions of `target` every 20 ms until told to stop.
async fn write(client: Client, target: String, stop: Arc<AtomicBool>) -> Writes {
    let mut writes = Writes::default();
    let mut last_refusal: Option<Instant> = None;
    let mut version = 0u64;
    while !stop.load(Ordering::Relaxed) {
        version += 1;
        let body = json!({ "metadata": { "bench_version": version } });
        let begun = Instant::now();
        match client
            .patch_status(&format!("/listings/{target}"), &body)
            .await
        {
            Some(200) => {
                writes.acked = version;
                if last_refusal.is_some() && writes.back_at.is_none() {
                    writes.back_at = Some(Instant::now());
                }
            }
            Some(503) => {
                writes.refused += 1;
                writes.slowest_refusal = writes.slowest_refusal.max(begun.elapsed());
                last_refusal = Some(Instant::now());
                writes.back_at = None;
            }
            _ => writes.other += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writes
}

/// The last version PostgreSQL holds for `target`: every acknowledged write must be there.
async fn stored_version(pg: &EmbeddedPostgres, target: &str) -> anyhow::Result<u64> {
    let mut config = pg.pg_config();
    config.connect_timeout(Duration::from_secs(5));
    let (db, connection) = config.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let stored: Option<i64> = tokio::time::timeout(
        Duration::from_secs(10),
        db.query_one(
            "SELECT (metadata->>'bench_version')::int8 FROM assets WHERE version_id = $1",
            &[&target],
        ),
    )
    .await
    .context("reading the written asset timed out")??
    .get(0);
    drop(db);
    driver.abort();
    Ok(stored.unwrap_or(0).max(0) as u64)
}
