//! The throughput scenarios, all measured by wrk against the same server in the same run, so
//! each can be compared with the baseline (a fixed body of an asset's size through the same
//! middleware): what the cache costs and saves, next to the same reads straight to PostgreSQL.

use cascade_core::metrics;
use serde_json::Value;

use super::Suite;
use super::ceiling::Ceiling;
use super::client::Client;
use super::freshness::Probe;
use super::pgbench;
use super::report::Row;
use super::seed003::{SEED003, Seed003};
use super::wrk::Wrk;
use crate::statements::{self, Statements};

/// The name of the ceiling's row.
pub const CEILING: &str = "ceiling: bare axum, fixed body, own process";

/// The name of the same-stack baseline's row.
const BASELINE: &str = "baseline (fixed body, same stack)";

/// The name of the row that reads straight from PostgreSQL.
pub(super) const DIRECT: &str = "PostgreSQL reads, same query, no cache";

/// The rows the replica and cluster rows stand beside: the same scenarios on the suite's single server.
pub(super) const HOT: &str = "hot reads GET /listings/{id}";
pub(super) const MISS: &str = "miss-heavy reads GET /listings/{id}";
pub(super) const WRITES: &str = "writes PATCH /listings/{id}";

/// Readers of the writes' staleness probe (beside wrk's connections, with one writer).
const PROBE_READERS: usize = 2;

/// What a throughput scenario measures: a server, through its wrk and its client, and the
/// PostgreSQL servers its catalog statements run on.
pub(super) struct Target<'a> {
    pub wrk: &'a Wrk,
    pub client: &'a Client,
    /// Each counts the statements it ran (pg_stat_statements); empty when none can, and the
    /// cache's loads are counted instead.
    pub statements: Vec<&'a Statements>,
}

impl Target<'_> {
    /// Calls so far of the statements starting with `prefix`, summed over the servers;
    /// `None` when none counts.
    pub(super) async fn calls(&self, prefix: &str) -> anyhow::Result<Option<u64>> {
        if self.statements.is_empty() {
            return Ok(None);
        }
        let mut calls = 0;
        for statements in &self.statements {
            calls += statements.calls(prefix).await?;
        }
        Ok(Some(calls))
    }
}

/// The versions a catalog's scenarios read and write.
pub(super) struct Catalog<'a> {
    /// Versions spread over the catalog, read warm by the hot scenarios.
    pub hot: &'a [String],
    /// Every version, in order.
    pub ids: &'a [String],
}

/// One wrk run: `paths` cycled through by every connection; with `namespace`, the cache
/// counters of that namespace and the catalog statements PostgreSQL ran go into the notes.
pub(super) struct Scenario {
    name: String,
    namespace: Option<&'static str>,
    paths: Vec<String>,
    /// `None` for GET.
    method: Option<&'static str>,
    /// Each path is to be read at most once (the miss-heavy walk): the run is cut short.
    once: bool,
    /// How long wrk runs, if not the suite's time.
    seconds: Option<u64>,
    /// Writes: the asset the staleness probe writes and reads beside wrk (not among
    /// `paths`), and the hot set its readers read.
    probe: Option<(String, Vec<String>)>,
}

/// Every throughput scenario, the baseline first, with throughput relative to it.
pub(super) async fn run(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    run_some(suite, |_| true).await
}

/// `--only miss`: the ceiling, the baseline, the direct PostgreSQL read and the miss-heavy
/// walk, as in the whole suite.
pub(super) async fn run_miss(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    run_some(suite, |scenario| {
        [BASELINE, DIRECT, MISS].contains(&scenario.name.as_str())
    })
    .await
}

/// `--only writes`: the ceiling, the baseline and the writes (64 `PATCH` connections with the
/// staleness probe beside them).
pub(super) async fn run_writes(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    run_some(suite, |scenario| {
        [BASELINE, WRITES].contains(&scenario.name.as_str())
    })
    .await
}

/// `--only replica` and `--only cluster`: the ceiling, the baseline, the direct PostgreSQL
/// read, and the hot reads, the miss-heavy walk and the writes the rows of the other
/// topology stand beside.
pub(super) async fn run_single_node(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    run_some(suite, |scenario| {
        [BASELINE, DIRECT, HOT, MISS, WRITES].contains(&scenario.name.as_str())
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
    let catalog = Catalog {
        hot: &suite.hot,
        ids: &suite.ids,
    };
    let mut rows: Vec<Row> = Vec::new();
    for mut scenario in scenarios(&catalog, body_size).into_iter().filter(wanted) {
        if scenario.once {
            scenario.fit_walk(rate_of(&rows, DIRECT), suite.wrk.seconds);
        }
        if scenario.name != WRITES {
            rows.push(scenario.run(&suite.target()).await?);
            if scenario.name == MISS {
                seed003_walk(suite, &scenario, &mut rows).await;
            }
            continue;
        }
        // Writes start from PostgreSQL's steady state, and pgbench's own write path on the
        // same server follows them.
        let warmed = pgbench::warm_wal(&suite.pg, if suite.quick { 64 } else { 512 }).await?;
        let mut writes = scenario.run(&suite.target()).await?;
        let scale = if suite.quick { 1 } else { 10 };
        let reference = pgbench::reference(
            &suite.pg,
            &suite.work,
            suite.wrk.connections,
            suite.wrk.seconds,
            scale,
        )
        .await?;
        writes.notes = format!(
            "{}; {warmed}; {:.2}× pgbench -N's transactions/s",
            writes.notes,
            writes.req_per_sec / reference.req_per_sec,
        );
        rows.push(writes);
        rows.push(reference);
    }
    // Ratios compare like with like: wrk on the same machine, same run. The ceiling is the
    // outside reference; the baseline (row 0, the same stack) shows the middleware's share.
    // pgbench's row is transactions, not HTTP requests: its ratio is in the writes' notes.
    let baseline = rows[0].req_per_sec;
    for row in rows.iter_mut().filter(|r| r.scenario != pgbench::PGBENCH) {
        set_ratios(row, ceiling.req_per_sec, baseline);
    }
    let mut ceiling = ceiling;
    ceiling.ratio_to_ceiling = Some(1.0);
    rows.insert(0, ceiling);
    Ok(rows)
}

/// Seed 003's own stack (`seed003.rs`) walking the walk's paths for as long, on the same
/// PostgreSQL and Redis, after it: its row, and the walk's ratio to it in the walk's notes
/// (the last row). Where it cannot run, or fails, the walk's notes say so and the suite goes
/// on without it.
async fn seed003_walk(suite: &Suite, walk: &Scenario, rows: &mut Vec<Row>) {
    let peer = match Seed003::missing() {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => seed003_row(suite, walk).await,
    };
    let Some(ours) = rows.last_mut() else {
        return;
    };
    match peer {
        Ok(row) => {
            ours.notes = format!(
                "{}; {:.2}× seed 003's stack",
                ours.notes,
                ours.req_per_sec / row.req_per_sec.max(1e-9)
            );
            rows.push(row);
        }
        Err(err) => {
            println!("bench: {SEED003}: left out, {err:#}");
            ours.notes = format!("{}; seed 003's stack left out: {err:#}", ours.notes);
        }
    }
}

/// [`seed003_walk`]'s run of the peer.
async fn seed003_row(suite: &Suite, walk: &Scenario) -> anyhow::Result<Row> {
    let peer = Seed003::start(&suite.pg.url(), &suite.redis.url()).await?;
    let wrk = suite.wrk.against(&peer.base, "");
    // node compiles its hot code as it runs: two seconds of reads of versions that do not
    // exist first (a Redis GET and a statement each, nothing cached), as every other row's
    // server has served the rows before it.
    let absent: Vec<String> = (0..1000).map(|i| format!("/listings/warm-{i}")).collect();
    wrk.run_for("seed 003's stack, warming up", &absent, None, 2)
        .await?;
    let seconds = walk.seconds.unwrap_or(suite.wrk.seconds);
    let mut row = wrk.run_for(SEED003, &walk.paths, None, seconds).await?;
    row.notes = format!(
        "{seconds} s over the walk's paths, from the same offsets, after 2 s of warm-up; cache-aside on the same PostgreSQL and Redis"
    );
    Ok(row)
}

/// The hot reads, the miss-heavy walk and the writes of `catalog`, named `names` (in that
/// order), exactly as the suite measures them on its own server, against another server
/// (`target`); with their ratios to `rows`' ceiling and baseline. `rows` are those measured
/// so far: the walk is cut by their direct PostgreSQL read's rate. `read` is called before
/// and after each row, and `note` of the two readings leads the row's notes.
pub(super) async fn run_beside<R>(
    target: &Target<'_>,
    catalog: &Catalog<'_>,
    rows: &[Row],
    names: [&str; 3],
    read: impl AsyncFn() -> anyhow::Result<R>,
    note: impl Fn(&R, &R) -> String,
) -> anyhow::Result<Vec<Row>> {
    let [hot, miss, writes] = names;
    let mut walk = miss_heavy(miss, catalog.ids);
    walk.fit_walk(rate_of(rows, DIRECT), target.wrk.seconds);
    let mut measured = Vec::new();
    for scenario in [
        hot_reads(hot, catalog.hot),
        walk,
        writes_of(writes, catalog),
    ] {
        let before = read().await?;
        let mut row = scenario.run(target).await?;
        let after = read().await?;
        row.notes = format!("{}; {}", note(&before, &after), row.notes);
        measured.push(row);
    }
    Ok(with_ratios(rows, measured))
}

/// The req/s of the row named `name` (0 when there is none).
fn rate_of(rows: &[Row], name: &str) -> f64 {
    rows.iter()
        .find(|r| r.scenario == name)
        .map_or(0.0, |r| r.req_per_sec)
}

/// `extra` rows (measured by wrk in the same run) with their ratios to the ceiling and the
/// baseline in `rows`.
pub(super) fn with_ratios(rows: &[Row], mut extra: Vec<Row>) -> Vec<Row> {
    let (ceiling, baseline) = (rate_of(rows, CEILING), rate_of(rows, BASELINE));
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

fn get(name: &str, namespace: Option<&'static str>, paths: Vec<String>) -> Scenario {
    Scenario {
        name: name.to_string(),
        namespace,
        paths,
        method: None,
        once: false,
        seconds: None,
        probe: None,
    }
}

/// `GET /listings/{id}` over the warm hot set: all hits.
fn hot_reads(name: &str, hot: &[String]) -> Scenario {
    get(name, Some("assets"), paths("/listings/", hot))
}

/// `GET /listings/{id}` walking every version, each at most once.
fn miss_heavy(name: &str, ids: &[String]) -> Scenario {
    Scenario {
        once: true,
        ..get(name, Some("assets"), paths("/listings/", ids))
    }
}

/// `PATCH /listings/{id}` over every version but the one the staleness probe writes.
fn writes_of(name: &str, catalog: &Catalog<'_>) -> Scenario {
    let written = catalog.hot[2 % catalog.hot.len()].clone();
    let others: Vec<String> = catalog
        .ids
        .iter()
        .filter(|id| **id != written)
        .cloned()
        .collect();
    Scenario {
        method: Some("PATCH"),
        probe: Some((written, catalog.hot.to_vec())),
        ..get(name, None, paths("/listings/", &others))
    }
}

fn scenarios(catalog: &Catalog<'_>, body_size: usize) -> Vec<Scenario> {
    let hot = catalog.hot;
    vec![
        get(BASELINE, None, vec![format!("/bench/fixed/{body_size}")]),
        hot_reads(HOT, hot),
        get(DIRECT, None, paths("/bench/pg/listings/", hot)),
        miss_heavy(MISS, catalog.ids),
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
        writes_of(WRITES, catalog),
    ]
}

impl Scenario {
    /// A miss-heavy walk must not come back to a path: that would be a hit. Its time is cut
    /// so that even at 1.5 times the rate of the direct PostgreSQL row, `direct` (batched
    /// loads without a lookup first run faster than one query per request), the walk reads
    /// at most 90 % of the paths; at most `most` seconds.
    fn fit_walk(&mut self, direct: f64, most: u64) {
        if direct > 0.0 {
            let fits = (0.9 * self.paths.len() as f64 / (1.5 * direct)).floor() as u64;
            self.seconds = Some(fits.clamp(1, most));
        }
    }

    async fn wrk(&self, wrk: &Wrk) -> anyhow::Result<Row> {
        let seconds = self.seconds.unwrap_or(wrk.seconds);
        let mut row = wrk
            .run_for(&self.name, &self.paths, self.method, seconds)
            .await?;
        if seconds != wrk.seconds {
            row.notes = format!("{seconds} s, so that no path is read twice");
        }
        Ok(row)
    }

    pub(super) async fn run(&self, target: &Target<'_>) -> anyhow::Result<Row> {
        let client = target.client;
        let blind_before = client.metric(metrics::BUS_BLIND_WAITS).await?;
        let Some(namespace) = self.namespace else {
            let probe = self
                .probe
                .as_ref()
                .map(|(written, hot)| Probe::start(client, hot, written, PROBE_READERS));
            let mut row = self.wrk(target.wrk).await?;
            let seen = match probe {
                Some(probe) => Some(probe.stop().await?),
                None => None,
            };
            if self.method.is_some() {
                // Writes wait for the bus: say how often it could not count acknowledgements.
                let blind = client.metric(metrics::BUS_BLIND_WAITS).await? - blind_before;
                row.notes = format!(
                    "{blind:.0} invalidations waited the bus's whole trust window (this instance did not hear the bus)"
                );
            }
            if let Some(seen) = seen {
                row.notes = format!(
                    "{} stale reads of {} checked, {} failed (beside wrk: one asset written every 20 ms, {PROBE_READERS} readers); {}",
                    seen.stale, seen.checked, seen.failed, row.notes
                );
            }
            return Ok(row);
        };
        let before = client.cache_stats(namespace).await?;
        let ran_before = target.calls(statements::CATALOG).await?;
        let mut row = self.wrk(target.wrk).await?;
        let ran_after = target.calls(statements::CATALOG).await?;
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
        // Reads that loaded without a lookup (`lease.rs`): stored, refused, or found a value
        // already there (a load that was not needed).
        let fills = delta(before, after, "speculative_fills");
        let unfilled = delta(before, after, "speculative_unfilled");
        let found = delta(before, after, "speculative_found");
        if fills + unfilled + found > 0 {
            let per_1000 = |n: u64| 1000.0 * n as f64 / row.requests.max(1) as f64;
            row.notes = format!(
                "{}, {:.1} speculative fills, {:.1} unfilled and {:.1} found per 1000 requests",
                row.notes,
                per_1000(fills),
                per_1000(unfilled),
                per_1000(found)
            );
        }
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
