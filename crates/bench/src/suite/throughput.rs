//! The throughput scenarios, all measured by wrk against the same server in the same run, so
//! each can be compared with the baseline (a fixed body of an asset's size through the same
//! middleware): what the cache costs and saves, next to the same reads straight to PostgreSQL.

use cascade_core::metrics;
use serde_json::Value;

use super::Suite;
use super::ceiling::Ceiling;
use super::report::Row;

/// The name of the ceiling's row.
pub const CEILING: &str = "ceiling: bare axum, fixed body, own process";
use crate::statements;

/// The name of the same-stack baseline's row.
const BASELINE: &str = "baseline (fixed body, same stack)";

/// The name of the row that reads straight from PostgreSQL.
const DIRECT: &str = "PostgreSQL reads, same query, no cache";

/// One wrk run: `paths` cycled through by every connection; with `namespace`, the cache
/// counters of that namespace and the catalog statements PostgreSQL ran go into the notes.
struct Scenario {
    name: &'static str,
    namespace: Option<&'static str>,
    paths: Vec<String>,
    /// `None` for GET.
    method: Option<&'static str>,
    /// Each path is to be read at most once (the miss-heavy walk): the run is cut short.
    once: bool,
    /// How long wrk runs, if not the suite's time.
    seconds: Option<u64>,
}

/// Every throughput scenario, the baseline first, with throughput relative to it.
pub(super) async fn run(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    run_some(suite, |_| true).await
}

/// `--only miss`: the ceiling, the baseline, the direct PostgreSQL read and the miss-heavy
/// walk, as in the whole suite.
pub(super) async fn run_miss(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    run_some(suite, |scenario| {
        scenario.once || [BASELINE, DIRECT].contains(&scenario.name)
    })
    .await
}

/// The throughput scenarios `wanted` picks (the baseline must be among them), with the
/// ceiling first.
async fn run_some(suite: &Suite, wanted: fn(&Scenario) -> bool) -> anyhow::Result<Vec<Row>> {
    let body_size = suite
        .client
        .get_ok(&format!("/listings/{}", suite.hot[0]))
        .await?
        .len();
    let ceiling = {
        let bare = Ceiling::start(body_size).await?;
        let paths = [crate::bare::PATH.to_string()];
        suite
            .wrk
            .run_against(&bare.base, CEILING, &paths, None)
            .await?
    };
    let mut rows: Vec<Row> = Vec::new();
    for mut scenario in scenarios(suite, body_size).into_iter().filter(wanted) {
        if scenario.once {
            // A miss-heavy walk must not come back to a path: that would be a hit. Its time
            // is cut so that even at the rate of the direct PostgreSQL row (a miss costs that
            // query and more) the walk reads at most 90 % of the paths.
            let direct = rows
                .iter()
                .find(|r| r.scenario == DIRECT)
                .map_or(0.0, |r| r.req_per_sec);
            if direct > 0.0 {
                let fits = (0.9 * scenario.paths.len() as f64 / direct).floor() as u64;
                scenario.seconds = Some(fits.clamp(1, suite.wrk.seconds));
            }
        }
        rows.push(scenario.run(suite).await?);
    }
    // Ratios compare like with like: wrk on the same machine, same run. The ceiling is the
    // outside reference; the baseline (row 0, the same stack) shows the middleware's share.
    let baseline = rows[0].req_per_sec;
    for row in &mut rows {
        set_ratios(row, ceiling.req_per_sec, baseline);
    }
    let mut ceiling = ceiling;
    ceiling.ratio_to_ceiling = Some(1.0);
    rows.insert(0, ceiling);
    Ok(rows)
}

/// `extra` rows (measured by wrk in the same run) with their ratios to the ceiling and the
/// baseline in `rows`.
pub(super) fn with_ratios(rows: &[Row], mut extra: Vec<Row>) -> Vec<Row> {
    let rate = |name: &str| {
        rows.iter()
            .find(|r| r.scenario == name)
            .map_or(0.0, |r| r.req_per_sec)
    };
    let (ceiling, baseline) = (rate(CEILING), rate(BASELINE));
    for row in &mut extra {
        set_ratios(row, ceiling, baseline);
    }
    extra
}

fn set_ratios(row: &mut Row, ceiling: f64, baseline: f64) {
    if baseline > 0.0 {
        row.ratio_to_baseline = Some(row.req_per_sec / baseline);
    }
    if ceiling > 0.0 {
        row.ratio_to_ceiling = Some(row.req_per_sec / ceiling);
    }
}

fn scenarios(suite: &Suite, body_size: usize) -> Vec<Scenario> {
    let (hot, ids) = (&suite.hot, &suite.ids);
    let get = |name, namespace, paths| Scenario {
        name,
        namespace,
        paths,
        method: None,
        once: false,
        seconds: None,
    };
    vec![
        get(BASELINE, None, vec![format!("/bench/fixed/{body_size}")]),
        get(
            "hot reads GET /listings/{id}",
            Some("assets"),
            paths("/listings/", hot),
        ),
        get(DIRECT, None, paths("/bench/pg/listings/", hot)),
        Scenario {
            once: true,
            ..get(
                "miss-heavy reads GET /listings/{id}",
                Some("assets"),
                paths("/listings/", ids),
            )
        },
        get(
            "bundle depth 3 GET /bundle",
            Some("bundles"),
            bundle_paths("/bundle", hot),
        ),
        get(
            "bundle depth 3, straight to PostgreSQL",
            None,
            bundle_paths("/bench/pg/bundle", hot),
        ),
        Scenario {
            name: "writes PATCH /listings/{id}",
            namespace: None,
            paths: paths("/listings/", ids),
            method: Some("PATCH"),
            once: false,
            seconds: None,
        },
    ]
}

impl Scenario {
    async fn wrk(&self, suite: &Suite) -> anyhow::Result<Row> {
        let seconds = self.seconds.unwrap_or(suite.wrk.seconds);
        let mut row = suite
            .wrk
            .run_for(self.name, &self.paths, self.method, seconds)
            .await?;
        if seconds != suite.wrk.seconds {
            row.notes = format!("{seconds} s, so that no path is read twice");
        }
        Ok(row)
    }

    async fn run(&self, suite: &Suite) -> anyhow::Result<Row> {
        let client = &suite.client;
        let blind_before = client.metric(metrics::BUS_BLIND_WAITS).await?;
        let Some(namespace) = self.namespace else {
            let mut row = self.wrk(suite).await?;
            if self.method.is_some() {
                // Writes wait for the bus: say how often it could not count acknowledgements.
                let blind = client.metric(metrics::BUS_BLIND_WAITS).await? - blind_before;
                row.notes = format!(
                    "{blind:.0} invalidations waited the bus's whole trust window (this instance did not hear the bus)"
                );
            }
            return Ok(row);
        };
        let before = client.cache_stats(namespace).await?;
        let ran_before = suite.calls(statements::CATALOG).await?;
        let mut row = self.wrk(suite).await?;
        let ran_after = suite.calls(statements::CATALOG).await?;
        let after = client.cache_stats(namespace).await?;
        let ran = ran_before.zip(ran_after).map(|(b, a)| a - b);
        annotate_cache(&mut row, &before, &after, ran);
        Ok(row)
    }
}

fn paths(prefix: &str, ids: &[String]) -> Vec<String> {
    ids.iter().map(|id| format!("{prefix}{id}")).collect()
}

fn bundle_paths(route: &str, ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| format!("{route}?versionId={id}&depth=3"))
        .collect()
}

/// The hit ratio from the engine's counters, and the catalog statements PostgreSQL itself
/// ran (`statements`, from pg_stat_statements; the engine's loads when it is unavailable).
fn annotate_cache(row: &mut Row, before: &Value, after: &Value, statements: Option<u64>) {
    let (queries, counted_by) = match statements {
        Some(n) => (n, "PostgreSQL statements"),
        None => (delta(before, after, "loads"), "cache loads"),
    };
    if let Some(ratio) = hit_ratio(before, after) {
        let cut = std::mem::take(&mut row.notes);
        row.notes = format!(
            "hit ratio {ratio:.1} %, {:.1} {counted_by} per 1000 requests",
            1000.0 * queries as f64 / row.requests.max(1) as f64
        );
        if !cut.is_empty() {
            row.notes = format!("{}; {cut}", row.notes);
        }
    }
}

/// Hits (either tier) over lookups between two readings of a namespace's counters, in
/// percent; `None` without lookups.
pub(super) fn hit_ratio(before: &Value, after: &Value) -> Option<f64> {
    let hits = delta(before, after, "near_hits") + delta(before, after, "shared_hits");
    let lookups = hits + delta(before, after, "misses");
    (lookups > 0).then(|| 100.0 * hits as f64 / lookups as f64)
}

fn delta(before: &Value, after: &Value, field: &str) -> u64 {
    after[field]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(before[field].as_u64().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(requests: u64) -> Row {
        Row {
            scenario: "x".into(),
            requests,
            req_per_sec: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            errors: 0,
            ratio_to_baseline: None,
            ratio_to_ceiling: None,
            notes: String::new(),
        }
    }

    #[test]
    fn statements_counted_by_postgresql_are_preferred_to_cache_loads() {
        let before = json!({ "shared_hits": 10, "misses": 0, "loads": 0 });
        let after = json!({ "shared_hits": 1990, "misses": 20, "loads": 20 });
        let mut counted = row(2000);
        annotate_cache(&mut counted, &before, &after, Some(4));
        assert_eq!(
            counted.notes,
            "hit ratio 99.0 %, 2.0 PostgreSQL statements per 1000 requests"
        );
        let mut inferred = row(2000);
        annotate_cache(&mut inferred, &before, &after, None);
        assert_eq!(
            inferred.notes,
            "hit ratio 99.0 %, 10.0 cache loads per 1000 requests"
        );
    }
}
