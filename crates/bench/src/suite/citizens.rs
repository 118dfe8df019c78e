//! `GET /citizens/{username}` (issue 14's benchmark): hot (every citizen cached) and cold
//! (every request a citizen nobody read, so one Venice call each), measured by wrk like the
//! other throughput rows. Venice is played by the test kit's stand-in, in this process, which
//! counts the calls it receives: "upstream calls per 1000 requests" is its count, not ours.
//! The cold row's stand-in answers each call after [`COLD_DELAY`], a plausible Venice.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::Suite;
use super::report::Row;
use super::throughput;

/// How long the stand-in takes to answer in the cold row.
pub const COLD_DELAY: Duration = Duration::from_millis(20);

/// Citizens read by the hot row, warmed first.
const HOT: usize = 100;

/// The server's `VENICE_POOL_SIZE` (its default): Venice calls in flight at once, so the cold
/// row can go no faster than this many per [`COLD_DELAY`].
pub const VENICE_POOL_SIZE: usize = 16;

/// The stand-in's citizens: `hot_0000`… for the hot row, `cold_00000`… for the cold row,
/// enough that the cold walk never comes back to one at the fastest rate it can reach.
pub fn citizens(seconds: u64) -> HashMap<String, Value> {
    let mut citizens = HashMap::new();
    let cold = cold_count(seconds);
    let names = (0..HOT)
        .map(|i| format!("hot_{i:04}"))
        .chain((0..cold).map(|i| format!("cold_{i:06}")));
    for (i, name) in names.enumerate() {
        let class = ["Nobili", "Cittadini", "Popolani"][i % 3];
        let ledger = json!({
            "success": true,
            "citizen": {
                "username": name,
                "socialClass": class,
                "ducats": 1000.0 + i as f64,
                "influence": i % 500,
            },
            "ledger": {
                "ownedLands": i % 7,
                "ownedBuildings": i % 11,
                "relationships": i % 13,
                "activeContracts": i % 5,
            },
        });
        citizens.insert(name, ledger);
    }
    citizens
}

/// Cold citizens for a walk of `seconds`: twice what the Venice pool could fetch in that time.
fn cold_count(seconds: u64) -> usize {
    let per_second = VENICE_POOL_SIZE as f64 / COLD_DELAY.as_secs_f64();
    (2.0 * per_second * seconds as f64) as usize
}

/// The hot and cold rows.
pub(super) async fn run(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    let hot: Vec<String> = (0..HOT).map(|i| format!("/citizens/hot_{i:04}")).collect();
    for path in &hot {
        suite.client.get_ok(path).await?;
    }
    let hot_row = measure(suite, "hot GET /citizens/{u} (cached)", &hot).await?;

    let cold: Vec<String> = (0..cold_count(suite.wrk.seconds))
        .map(|i| format!("/citizens/cold_{i:06}"))
        .collect();
    suite.venice.slow_down(COLD_DELAY);
    let cold_row = measure(
        suite,
        "cold GET /citizens/{u} (Venice stand-in answering in 20 ms)",
        &cold,
    )
    .await;
    suite.venice.recover();
    let mut cold_row = cold_row?;
    cold_row.notes = format!(
        "{}; each citizen read once; VENICE_POOL_SIZE {VENICE_POOL_SIZE} calls in flight at most",
        cold_row.notes
    );
    Ok(vec![hot_row, cold_row])
}

/// wrk over `paths`, with the `venice` namespace's hit ratio and the stand-in's calls.
async fn measure(suite: &Suite, name: &str, paths: &[String]) -> anyhow::Result<Row> {
    let before = suite.client.cache_stats("venice").await?;
    let calls_before = suite.venice.ledger_calls();
    let mut row = suite
        .wrk
        .run_for(name, paths, None, suite.wrk.seconds)
        .await?;
    let calls = suite.venice.ledger_calls() - calls_before;
    let after = suite.client.cache_stats("venice").await?;
    let hits = throughput::hit_ratio(&before, &after).map_or_else(
        || "no lookups".to_string(),
        |r| format!("hit ratio {r:.1} %"),
    );
    row.notes = format!(
        "{hits}, {:.1} upstream calls per 1000 requests (counted by the Venice stand-in)",
        1000.0 * calls as f64 / row.requests.max(1) as f64
    );
    Ok(row)
}
