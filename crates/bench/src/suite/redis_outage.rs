//! Redis killed under load, then started again empty: every answer must still be a success
//! (the cache is an optimisation, PostgreSQL the truth), no read may return a version older
//! than one already acknowledged to the writer, and the server must go back to shared-tier
//! hits by itself once Redis returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Suite;
use super::client::Client;
use super::report::Row;

/// What the readers and the writer share while Redis comes and goes.
#[derive(Default)]
struct Shared {
    /// The last version acknowledged to the writer: no later read may return an older one.
    acknowledged: AtomicU64,
    stop: AtomicBool,
    /// Requests (reads or writes) that did not succeed.
    failed: AtomicU64,
    /// Reads of the written asset older than what was acknowledged before they were sent.
    stale: AtomicU64,
}

/// Concurrent readers of the hot set.
const READERS: usize = 16;
/// How long the server has to go back to shared-tier hits after Redis returns.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

pub(super) async fn run(suite: &mut Suite) -> anyhow::Result<Row> {
    let outage = suite.outage();
    let written = suite.hot[0].clone();
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (client, hot) = (suite.client.clone(), suite.hot.clone());
            tokio::spawn(read(client, hot, written.clone(), r, shared.clone()))
        })
        .collect();
    let writer = tokio::spawn(write(suite.client.clone(), written, shared.clone()));

    let lead = outage / 2;
    tokio::time::sleep(lead).await;
    suite.redis.kill();
    tokio::time::sleep(outage).await;
    suite.redis.restart().await;
    let recovered = back_to_shared_hits(&suite.client).await?;
    tokio::time::sleep(lead).await;
    shared.stop.store(true, Ordering::Relaxed);

    let mut latencies = Vec::new();
    for reader in readers {
        latencies.extend(reader.await?);
    }
    writer.await?;
    let failed = shared.failed.load(Ordering::Relaxed);
    let notes = format!(
        "{failed} failed, {} stale reads; back to shared-tier hits {} after Redis returned",
        shared.stale.load(Ordering::Relaxed),
        match recovered {
            Some(t) => format!("{} ms", t.as_millis()),
            None => format!("not within {} s", RECOVERY_BOUND.as_secs()),
        }
    );
    Ok(Row::from_latencies(
        format!("Redis killed for {}s under load", outage.as_secs()),
        &mut latencies,
        started.elapsed(),
        failed,
        notes,
    ))
}

/// Reads the hot set until told to stop, every fourth read the written asset; returns each
/// read's latency.
async fn read(
    client: Client,
    hot: Vec<String>,
    written: String,
    first: usize,
    shared: Arc<Shared>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut i = first;
    while !shared.stop.load(Ordering::Relaxed) {
        i += 1;
        let id = if i.is_multiple_of(4) {
            &written
        } else {
            &hot[i % hot.len()]
        };
        let floor = shared.acknowledged.load(Ordering::SeqCst);
        let begun = Instant::now();
        match client.get_ok(&format!("/listings/{id}")).await {
            Ok(body) if id == &written && version_of(&body) < floor => {
                shared.stale.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        latencies.push(begun.elapsed());
    }
    latencies
}

/// Writes increasing versions of `written` every 20 ms until told to stop, publishing each
/// acknowledged one.
async fn write(client: Client, written: String, shared: Arc<Shared>) {
    let mut version = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        version += 1;
        let body = json!({ "metadata": { "bench_version": version } });
        match client.patch(&format!("/listings/{written}"), &body).await {
            Ok(()) => shared.acknowledged.store(version, Ordering::SeqCst),
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long after Redis returned the server's shared-tier hits moved again; `None` when
/// they did not within [`RECOVERY_BOUND`].
async fn back_to_shared_hits(client: &Client) -> anyhow::Result<Option<Duration>> {
    let restarted = Instant::now();
    let base = client.cache_counter("assets", "shared_hits").await?;
    while restarted.elapsed() < RECOVERY_BOUND {
        if client.cache_counter("assets", "shared_hits").await? > base {
            return Ok(Some(restarted.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

/// The `bench_version` the writer put in an asset's metadata (0 before any).
fn version_of(body: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["metadata"]["bench_version"].as_u64())
        .unwrap_or(0)
}
