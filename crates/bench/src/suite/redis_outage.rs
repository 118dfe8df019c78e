//! Redis killed under load, then started again empty: every answer must still be a success
//! (the cache is an optimisation, PostgreSQL the truth), no read may return a version older
//! than one already acknowledged to the writer, and the server must go back to shared-tier
//! hits by itself once Redis returns.

use std::time::{Duration, Instant};

use super::Suite;
use super::client::Client;
use super::freshness::Probe;
use super::report::Row;

/// Concurrent readers of the hot set.
const READERS: usize = 16;
/// How long the server has to go back to shared-tier hits after Redis returns.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

pub(super) async fn run(suite: &mut Suite) -> anyhow::Result<Row> {
    let outage = suite.outage();
    let started = Instant::now();
    let probe = Probe::start(&suite.client, &suite.hot, &suite.hot[0], READERS);

    let lead = outage / 2;
    tokio::time::sleep(lead).await;
    suite.redis.kill();
    tokio::time::sleep(outage).await;
    suite.redis.restart().await;
    let recovered = back_to_shared_hits(std::slice::from_ref(&suite.client))
        .await?
        .into_iter()
        .next()
        .flatten();
    tokio::time::sleep(lead).await;
    let mut seen = probe.stop().await?;

    let notes = format!(
        "{} failed, {} stale reads; back to shared-tier hits {} after Redis returned",
        seen.failed,
        seen.stale,
        recovery_note(recovered)
    );
    Ok(Row::from_latencies(
        format!("Redis killed for {}s under load", outage.as_secs()),
        &mut seen.latencies,
        started.elapsed(),
        seen.failed,
        notes,
    ))
}

/// How long after Redis returned each client's server's shared-tier hits moved again; `None`
/// for one whose did not within [`RECOVERY_BOUND`].
pub(super) async fn back_to_shared_hits(
    clients: &[Client],
) -> anyhow::Result<Vec<Option<Duration>>> {
    let restarted = Instant::now();
    let mut base = Vec::with_capacity(clients.len());
    for client in clients {
        base.push(client.cache_counter("assets", "shared_hits").await?);
    }
    let mut back = vec![None; clients.len()];
    while restarted.elapsed() < RECOVERY_BOUND && back.contains(&None) {
        for ((client, base), back) in clients.iter().zip(&base).zip(&mut back) {
            if back.is_none() && client.cache_counter("assets", "shared_hits").await? > *base {
                *back = Some(restarted.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(back)
}

/// A recovery time as a row says it.
pub(super) fn recovery_note(recovered: Option<Duration>) -> String {
    match recovered {
        Some(t) => format!("{} ms", t.as_millis()),
        None => format!("not within {} s", RECOVERY_BOUND.as_secs()),
    }
}
