//! `cascade bench`: the whole benchmark suite, in one run, on this machine.
//!
//! It starts what it needs (a private PostgreSQL, a private `redis-server`, and `cascade serve`
//! as a separate process), seeds a catalog, and measures each scenario with `wrk` (throughput
//! and latency) or, where correctness is measured too, with its own client:
//!
//! | scenario | what |
//! |---|---|
//! | baseline | the same server stack returning a fixed body of the size of an asset (the ceiling) |
//! | hot reads | `GET /listings/{id}` over a small warm set (all hits) |
//! | miss-heavy reads | `GET /listings/{id}` walking every asset |
//! | PostgreSQL reads | the same query as `GET /listings/{id}`, straight to PostgreSQL, no cache |
//! | bundle depth 3 | `GET /bundle?versionId=…&depth=3` over a warm set, and straight to PostgreSQL |
//! | writes | `PATCH /listings/{id}`: a write plus its invalidations |
//! | stampede | 1000 concurrent requests for one cold key: PostgreSQL queries counted |
//! | Redis outage | Redis killed for 10 s under load: failed requests, stale reads, recovery |
//! | PostgreSQL restart | PostgreSQL stopped for 10 s under load: how fast refusals come, no acknowledged write lost, recovery |
//!
//! The table is printed and written to `target/bench/results.{json,md}`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cascade_core::db::EmbeddedPostgres;
use cascade_core::metrics;
use serde::Serialize;
use serde_json::{Value, json};

/// What `cascade bench` was asked to do.
pub struct Options {
    /// A few seconds in all: small catalog, short runs. For CI, so the suite cannot rot.
    pub quick: bool,
    pub assets: Option<usize>,
    pub seconds: Option<u64>,
    pub connections: usize,
    pub out: PathBuf,
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub requests: u64,
    pub req_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
    /// Throughput over the baseline's.
    pub ratio_to_baseline: Option<f64>,
    pub notes: String,
}

pub async fn run(options: Options) -> anyhow::Result<ExitCode> {
    let wrk = which("wrk")
        .context("wrk is not installed: run bench/run (it installs it), or apt-get install wrk")?;
    let assets = options
        .assets
        .unwrap_or(if options.quick { 2_000 } else { 100_000 });
    let seconds = options
        .seconds
        .unwrap_or(if options.quick { 2 } else { 10 });
    let work = options.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!(
        "bench: {assets} assets, {seconds}s per scenario, {} connections",
        options.connections
    );

    // PostgreSQL and Redis of our own, on a private socket and a free loopback port.
    let pg_dir = work.join("pg");
    let mut pg = EmbeddedPostgres::start(&pg_dir, Duration::from_secs(120)).await?;
    let counting = enable_statement_counting(&mut pg, &pg_dir).await?;
    let database_url = pg.url();
    let mut redis = RedisProc::start(&work)?;
    let server = ServerProc::start(&work, &database_url, &redis.url())?;
    server.wait_ready(Duration::from_secs(120)).await?;
    let mut client = Client::new(&server.base)?;
    client.register(BENCH_ACCOUNT).await?;

    eprintln!("bench: seeding {assets} assets");
    seed(&database_url, assets)?;
    let (pg_client, _driver) = connect(&pg).await?;
    let statements = Statements {
        db: &pg_client,
        counting,
    };
    let ids: Vec<String> = pg_client
        .query("SELECT version_id FROM assets ORDER BY version_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.len() < 100 {
        bail!("the seed produced {} assets; expected {assets}", ids.len());
    }
    let hot: Vec<String> = ids
        .iter()
        .step_by(ids.len() / 100)
        .take(100)
        .cloned()
        .collect();
    for id in &hot {
        client.get_ok(&format!("/listings/{id}")).await?;
        client
            .get_ok(&format!("/bundle?versionId={id}&depth=3"))
            .await?;
    }
    let body_size = client.get_ok(&format!("/listings/{}", hot[0])).await?.len();

    let load = Wrk {
        bin: wrk,
        base: server.base.clone(),
        work: work.clone(),
        seconds,
        connections: options.connections,
        token: client.token.clone(),
    };
    let scenario = |name, namespace, paths, method| Scenario {
        name,
        namespace,
        paths,
        method,
    };
    let scenarios = [
        scenario(
            "baseline (fixed body, same stack)",
            None,
            vec![format!("/bench/fixed/{body_size}")],
            None,
        ),
        scenario(
            "hot reads GET /listings/{id}",
            Some("assets"),
            paths("/listings/", &hot),
            None,
        ),
        scenario(
            "PostgreSQL reads, same query, no cache",
            None,
            paths("/bench/pg/listings/", &hot),
            None,
        ),
        scenario(
            "miss-heavy reads GET /listings/{id}",
            Some("assets"),
            paths("/listings/", &ids),
            None,
        ),
        scenario(
            "bundle depth 3 GET /bundle",
            Some("bundles"),
            bundle_paths("/bundle", &hot),
            None,
        ),
        scenario(
            "bundle depth 3, straight to PostgreSQL",
            None,
            bundle_paths("/bench/pg/bundle", &hot),
            None,
        ),
        scenario(
            "writes PATCH /listings/{id}",
            None,
            paths("/listings/", &ids),
            Some("PATCH"),
        ),
    ];
    let mut rows = Vec::new();
    for s in &scenarios {
        let blind_before = client.metric(metrics::BUS_BLIND_WAITS).await?;
        let mut row = match s.namespace {
            Some(namespace) => {
                load.cached(&client, &statements, namespace, s.name, &s.paths, s.method)
                    .await?
            }
            None => load.run(s.name, &s.paths, s.method)?,
        };
        if s.method.is_some() {
            // Writes wait for the bus: say how often it could not count acknowledgements.
            let blind = client.metric(metrics::BUS_BLIND_WAITS).await? - blind_before;
            row.notes = format!(
                "{blind:.0} invalidations waited the bus's whole trust window (this instance did not hear the bus)"
            );
        }
        rows.push(row);
    }
    // Throughput ratios compare like with like: wrk against the same server, same run.
    let baseline = rows[0].req_per_sec;
    for row in &mut rows {
        if baseline > 0.0 {
            row.ratio_to_baseline = Some(row.req_per_sec / baseline);
        }
    }

    let n = if options.quick { 200 } else { 1000 };
    rows.push(stampede(&client, &statements, &ids, n).await?);
    let outage = if options.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    rows.push(redis_outage(&client, &mut redis, &hot, outage).await?);
    drop(pg_client);
    rows.push(pg_restart(&client, &mut pg, &pg_dir, &hot, outage).await?);
    let markdown = render_markdown(&rows, assets, seconds, options.connections);
    println!("{markdown}");
    std::fs::write(options.out.join("results.md"), &markdown)?;
    std::fs::write(
        options.out.join("results.json"),
        serde_json::to_vec_pretty(&json!({
            "assets": assets,
            "seconds_per_scenario": seconds,
            "connections": options.connections,
            "quick": options.quick,
            "rows": rows,
        }))?,
    )?;
    eprintln!("bench: wrote {}/results.{{md,json}}", options.out.display());
    drop(server);
    drop(redis);
    drop(pg);
    let _ = std::fs::remove_dir_all(&work);
    Ok(ExitCode::SUCCESS)
}

/// One wrk run: `paths` cycled through by every connection; with `namespace`, the cache
/// counters of that namespace during the run go into the row's notes.
struct Scenario {
    name: &'static str,
    namespace: Option<&'static str>,
    paths: Vec<String>,
    method: Option<&'static str>,
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
    let delta = |field: &str| {
        after[field]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before[field].as_u64().unwrap_or(0))
    };
    let hits = delta("near_hits") + delta("shared_hits");
    let lookups = hits + delta("misses");
    let (queries, counted_by) = match statements {
        Some(n) => (n, "PostgreSQL statements"),
        None => (delta("loads"), "cache loads"),
    };
    if lookups > 0 {
        row.notes = format!(
            "hit ratio {:.1} %, {:.1} {counted_by} per 1000 requests",
            100.0 * hits as f64 / lookups as f64,
            1000.0 * queries as f64 / row.requests.max(1) as f64
        );
    }
}

/// Counts what PostgreSQL ran on the catalog's tables, from its own pg_stat_statements: the
/// bench's figures of "queries" are measured at the server, not inferred from our counters.
struct Statements<'a> {
    db: &'a tokio_postgres::Client,
    counting: bool,
}

impl Statements<'_> {
    /// Calls so far of statements on catalog tables, and of the asset lookup by version.
    async fn now(&self) -> anyhow::Result<Option<(u64, u64)>> {
        if !self.counting {
            return Ok(None);
        }
        let row = self
            .db
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8, \
                        coalesce(sum(calls) FILTER (WHERE query LIKE '%FROM assets a WHERE a.version_id = $1%'), 0)::int8 \
                 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND query ~ '\\m(assets|lineage_edges|receipts|policies|producers)\\M' \
                   AND query NOT LIKE '%pg_stat_statements%'",
                &[],
            )
            .await?;
        Ok(Some((
            row.get::<_, i64>(0) as u64,
            row.get::<_, i64>(1) as u64,
        )))
    }
}

/// Loads pg_stat_statements into the bench's private PostgreSQL (one restart) when the server
/// has it (Debian's postgresql does); false when it does not.
async fn enable_statement_counting(
    pg: &mut EmbeddedPostgres,
    pg_dir: &Path,
) -> anyhow::Result<bool> {
    let (db, driver) = connect(pg).await?;
    let available: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'",
            &[],
        )
        .await?
        .get(0);
    if available == 0 {
        eprintln!("bench: pg_stat_statements unavailable; counting the cache's loads instead");
        return Ok(false);
    }
    db.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        .await?;
    drop(db);
    driver.abort();
    tokio::task::block_in_place(|| pg.stop());
    *pg = EmbeddedPostgres::start(pg_dir, Duration::from_secs(60)).await?;
    let (db, _driver) = connect(pg).await?;
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    Ok(true)
}

/// `n` concurrent requests for one key nobody has read: how many loads reach PostgreSQL.
async fn stampede(
    client: &Client,
    statements: &Statements<'_>,
    ids: &[String],
    n: usize,
) -> anyhow::Result<Row> {
    // The last asset has not been read by any scenario that keeps it cached... unless the
    // miss-heavy walk reached it; drop it from the cache to be sure.
    let id = ids.last().expect("ids").clone();
    client.invalidate_asset(&id).await?;
    let before = client.cache_stats("assets").await?;
    let statements_before = statements.now().await?;
    let started = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        let barrier = barrier.clone();
        let path = format!("/listings/{id}");
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let begun = Instant::now();
            let ok = client.get_ok(&path).await.is_ok();
            (ok, begun.elapsed())
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (ok, latency) = task.await?;
        errors += u64::from(!ok);
        latencies.push(latency);
    }
    let elapsed = started.elapsed();
    let after = client.cache_stats("assets").await?;
    let loads = after["loads"].as_u64().unwrap_or(0) - before["loads"].as_u64().unwrap_or(0);
    let notes = match (statements_before, statements.now().await?) {
        (Some((_, lookups_before)), Some((_, lookups_after))) => {
            let queries = lookups_after - lookups_before;
            format!(
                "{queries} PostgreSQL {} for {n} requests (pg_stat_statements; {loads} cache load(s))",
                if queries == 1 { "query" } else { "queries" }
            )
        }
        _ => format!("{loads} PostgreSQL load(s) for {n} requests"),
    };
    let (p50, p99) = percentiles(&mut latencies);
    Ok(Row {
        scenario: format!("cold-key stampede ({n} concurrent)"),
        requests: n as u64,
        req_per_sec: n as f64 / elapsed.as_secs_f64(),
        p50_ms: p50,
        p99_ms: p99,
        errors,
        ratio_to_baseline: None,
        notes,
    })
}

/// Reads and writes under load while Redis is killed for `outage`: every answer must be a
/// 200 and no read may return a version older than one already acknowledged.
async fn redis_outage(
    client: &Client,
    redis: &mut RedisProc,
    hot: &[String],
    outage: Duration,
) -> anyhow::Result<Row> {
    let writes_to = hot[0].clone();
    let acknowledged = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut readers = Vec::new();
    for r in 0..16 {
        let (client, hot, acknowledged, stop, failed, stale, writes_to) = (
            client.clone(),
            hot.to_vec(),
            acknowledged.clone(),
            stop.clone(),
            failed.clone(),
            stale.clone(),
            writes_to.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Every fourth read is of the key being written.
                let id = if i % 4 == 0 {
                    &writes_to
                } else {
                    &hot[i % hot.len()]
                };
                let floor = acknowledged.load(Ordering::SeqCst);
                let begun = Instant::now();
                match client.get_ok(&format!("/listings/{id}")).await {
                    Ok(body) => {
                        if id == &writes_to && version_of(&body) < floor {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies.push(begun.elapsed());
            }
            latencies
        }));
    }
    let writer = {
        let (client, acknowledged, stop, failed, writes_to) = (
            client.clone(),
            acknowledged.clone(),
            stop.clone(),
            failed.clone(),
            writes_to.clone(),
        );
        tokio::spawn(async move {
            let mut version = 0u64;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                let body = json!({ "metadata": { "bench_version": version } });
                match client.patch(&format!("/listings/{writes_to}"), &body).await {
                    Ok(()) => acknowledged.store(version, Ordering::SeqCst),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let lead = outage / 2;
    tokio::time::sleep(lead).await;
    redis.kill();
    tokio::time::sleep(outage).await;
    redis.restart()?;
    let restarted = Instant::now();
    // Back to cache hits: shared-tier hits move again.
    let base = client.cache_stats("assets").await?["shared_hits"]
        .as_u64()
        .unwrap_or(0);
    let mut recovered = None;
    while restarted.elapsed() < Duration::from_secs(30) {
        let now = client.cache_stats("assets").await?["shared_hits"]
            .as_u64()
            .unwrap_or(0);
        if now > base {
            recovered = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(lead).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for reader in readers {
        latencies.extend(reader.await?);
    }
    writer.await?;
    let elapsed = started.elapsed();
    let requests = latencies.len() as u64;
    let (p50, p99) = percentiles(&mut latencies);
    Ok(Row {
        scenario: format!("Redis killed for {}s under load", outage.as_secs()),
        requests,
        req_per_sec: requests as f64 / elapsed.as_secs_f64(),
        p50_ms: p50,
        p99_ms: p99,
        errors: failed.load(Ordering::Relaxed),
        ratio_to_baseline: None,
        notes: format!(
            "{} failed, {} stale reads; back to shared-tier hits {} after Redis returned",
            failed.load(Ordering::Relaxed),
            stale.load(Ordering::Relaxed),
            match recovered {
                Some(t) => format!("{} ms", t.as_millis()),
                None => "not within 30 s".into(),
            }
        ),
    })
}

/// Reads (of cached keys) and writes while PostgreSQL is stopped for `down` and started again:
/// writes must be refused fast (503 within the acquire timeout, not hang), no acknowledged
/// write may be missing afterwards, and writes must come back by themselves.
async fn pg_restart(
    client: &Client,
    pg: &mut EmbeddedPostgres,
    pg_dir: &Path,
    hot: &[String],
    down: Duration,
) -> anyhow::Result<Row> {
    let target = hot[1].clone();
    // Readers read the other hot keys: the written one is invalidated by every acknowledged
    // write, so while PostgreSQL is down it can only be refused (that is the writer's count).
    let readable: Vec<String> = hot.iter().filter(|h| **h != target).cloned().collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut readers = Vec::new();
    for r in 0..8 {
        let (client, hot, stop) = (client.clone(), readable.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let begun = Instant::now();
                match client
                    .get_ok(&format!("/listings/{}", hot[i % hot.len()]))
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                latencies.push(begun.elapsed());
            }
            (ok, failed, latencies)
        }));
    }
    let writer = {
        let (client, stop, target) = (client.clone(), stop.clone(), target.clone());
        tokio::spawn(async move {
            let (mut acked, mut refused, mut other) = (0u64, 0u64, 0u64);
            let mut slowest_refusal = Duration::ZERO;
            let mut last_refusal: Option<Instant> = None;
            let mut back_at: Option<Instant> = None;
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
                        acked = version;
                        if last_refusal.is_some() && back_at.is_none() {
                            back_at = Some(Instant::now());
                        }
                    }
                    Some(503) => {
                        refused += 1;
                        slowest_refusal = slowest_refusal.max(begun.elapsed());
                        last_refusal = Some(Instant::now());
                        back_at = None;
                    }
                    _ => other += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, refused, other, slowest_refusal, back_at)
        })
    };
    tokio::time::sleep(down / 2).await;
    tokio::task::block_in_place(|| pg.stop());
    tokio::time::sleep(down).await;
    *pg = EmbeddedPostgres::start(pg_dir, Duration::from_secs(60)).await?;
    let restarted = Instant::now();
    tokio::time::sleep(down / 2 + Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut reads_ok, mut reads_failed, mut latencies) = (0, 0, Vec::new());
    for reader in readers {
        let (ok, failed, l) = reader.await?;
        reads_ok += ok;
        reads_failed += failed;
        latencies.extend(l);
    }
    let (acked, refused, other, slowest_refusal, back_at) = writer.await?;
    // Every acknowledged write is in PostgreSQL: the last one is what the row holds.
    let (db, _driver) = connect(pg).await?;
    let stored: Option<i64> = db
        .query_one(
            "SELECT (metadata->>'bench_version')::int8 FROM assets WHERE version_id = $1",
            &[&target],
        )
        .await?
        .get(0);
    let lost = acked.saturating_sub(stored.unwrap_or(0).max(0) as u64);
    let elapsed = started.elapsed();
    let requests = latencies.len() as u64;
    let (p50, p99) = percentiles(&mut latencies);
    Ok(Row {
        scenario: format!("PostgreSQL stopped for {}s under load", down.as_secs()),
        requests,
        req_per_sec: requests as f64 / elapsed.as_secs_f64(),
        p50_ms: p50,
        p99_ms: p99,
        errors: reads_failed + other,
        ratio_to_baseline: None,
        notes: format!(
            "reads {reads_ok} ok, {reads_failed} failed; writes refused with 503: {refused} (slowest {} ms), other errors: {other}; acknowledged writes lost: {lost}; writes back {} after PostgreSQL returned",
            slowest_refusal.as_millis(),
            match back_at {
                Some(at) => format!("{} ms", at.saturating_duration_since(restarted).as_millis()),
                None if refused == 0 => "(never refused)".into(),
                None => "not before the end".into(),
            }
        ),
    })
}

fn version_of(body: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["metadata"]["bench_version"].as_u64())
        .unwrap_or(0)
}

fn percentiles(latencies: &mut [Duration]) -> (f64, f64) {
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (at(0.50), at(0.99))
}

fn render_markdown(rows: &[Row], assets: usize, seconds: u64, connections: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{assets} assets; {seconds} s per wrk scenario, {connections} connections; one run, one machine ({} cores)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let _ = writeln!(
        out,
        "| scenario | req/s | p50 ms | p99 ms | errors | × baseline | notes |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            row.scenario,
            row.req_per_sec,
            row.p50_ms,
            row.p99_ms,
            row.errors,
            row.ratio_to_baseline
                .map_or_else(|| "–".into(), |r| format!("{r:.2}")),
            row.notes
        );
    }
    out
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// The account that owns the seeded producers, so the suite's writes are authorised as a
/// user's would be.
const BENCH_ACCOUNT: &str = "bench";

fn seed(database_url: &str, assets: usize) -> anyhow::Result<()> {
    let status = Command::new(std::env::current_exe()?)
        .args([
            "seed",
            "catalog",
            "--assets",
            &assets.to_string(),
            "--seed",
            "42",
            "--owner",
            BENCH_ACCOUNT,
        ])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cascade seed catalog failed: {status}");
    }
    Ok(())
}

async fn connect(
    pg: &EmbeddedPostgres,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let (client, connection) = pg.pg_config().connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, driver))
}

/// A loopback TCP port nobody listens on (the kernel picks it).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A private `redis-server`: no persistence, killed on drop.
struct RedisProc {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisProc {
    fn start(work: &Path) -> anyhow::Result<Self> {
        let mut redis = RedisProc {
            port: free_port()?,
            dir: work.join("redis"),
            child: None,
        };
        std::fs::create_dir_all(&redis.dir)?;
        redis.restart()?;
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (apt-get install redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on port {} in time", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `cascade serve` as a child process, so load and server do not share a runtime.
struct ServerProc {
    base: String,
    child: Child,
}

impl ServerProc {
    fn start(work: &Path, database_url: &str, redis_url: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let log = std::fs::File::create(work.join("server.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .env("BENCH_ROUTES", "true")
            .env("RATE_LIMIT_API", "off")
            // The bench account's one token must outlive the longest run.
            .env("ACCESS_TOKEN_TTL", "24h")
            .env("SESSION_DEFAULT_TTL", "24h")
            .env("PG_POOL_MAX", "32")
            .env("REDIS_TIMEOUT", "250ms")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(ServerProc {
            base: format!("http://127.0.0.1:{port}"),
            child,
        })
    }

    async fn wait_ready(&self, bound: Duration) -> anyhow::Result<()> {
        let client = Client::new(&self.base)?;
        let deadline = Instant::now() + bound;
        while client.get_ok("/health").await.is_err() {
            if Instant::now() > deadline {
                bail!("cascade serve did not answer within {bound:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small HTTP client for the suite's own requests.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    /// The bench account's access token, which writes carry (the seeded producers are its).
    token: String,
}

impl Client {
    fn new(base: &str) -> anyhow::Result<Self> {
        let http =
            cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))?;
        Ok(Client {
            http,
            base: base.to_string(),
            token: String::new(),
        })
    }

    /// Registers the bench account; its token authorises the suite's writes from then on.
    async fn register(&mut self, username: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/auth/register", self.base))
            .json(&json!({ "username": username, "password": "bench password, not secret" }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("registering {username}: {status}: {body}");
        }
        self.token = body["access_token"]
            .as_str()
            .context("no access_token in the registration answer")?
            .to_string();
        Ok(())
    }

    async fn get_ok(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let response = self.http.get(format!("{}{path}", self.base)).send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body.to_vec())
    }

    async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<()> {
        let response = self
            .http
            .patch(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("PATCH {path}: {}", response.status());
        }
        Ok(())
    }

    /// The status of a `PATCH`, or `None` when no answer came.
    async fn patch_status(&self, path: &str, body: &Value) -> Option<u16> {
        let response = self
            .http
            .patch(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    async fn invalidate_asset(&self, id: &str) -> anyhow::Result<()> {
        // A no-op write invalidates the asset everywhere, exactly as a user's write would.
        self.patch(
            &format!("/listings/{id}"),
            &json!({ "metadata": { "stampede": true } }),
        )
        .await
    }

    /// The value of an unlabelled series of `/metrics` (0 when absent).
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = String::from_utf8(self.get_ok("/metrics").await?)?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// The cache counters of `namespace` from `/health/db`.
    async fn cache_stats(&self, namespace: &str) -> anyhow::Result<Value> {
        let body: Value = serde_json::from_slice(&self.get_ok("/health/db").await?)?;
        body["cache"]["namespaces"]
            .as_array()
            .and_then(|all| all.iter().find(|ns| ns["namespace"] == namespace))
            .cloned()
            .map_or_else(|| Ok(json!({})), Ok)
    }
}

/// `wrk` runs: each scenario is a list of paths the connections cycle through.
struct Wrk {
    bin: PathBuf,
    base: String,
    work: PathBuf,
    seconds: u64,
    connections: usize,
    /// The access token that writes carry.
    token: String,
}

/// wrk's threads (one per core here; wrk itself is light).
const WRK_THREADS: usize = 2;

const WRK_SCRIPT: &str = r#"
local paths = {}
for line in io.lines(PATHS_FILE) do paths[#paths + 1] = line end
local counter = 0
-- A global, not a local: setup's thread:set writes the thread's globals, which a local of
-- the same name would shadow (every thread would then start at 0).
offset = 0
local threads = {}
-- Each thread starts its walk at its own share of the paths, so a walk over many paths (the
-- miss-heavy case) reads each path once before any thread comes back to it.
function setup(thread)
  thread:set("offset", #threads * math.floor(#paths / THREADS))
  threads[#threads + 1] = thread
end
function init(args)
  counter = offset
end
function request()
  counter = counter + 1
  local path = paths[(counter % #paths) + 1]
  if METHOD == "PATCH" then
    return wrk.format("PATCH", path,
      { ["Content-Type"] = "application/json", ["Authorization"] = AUTHORIZATION },
      '{"metadata":{"bench":' .. counter .. '}}')
  end
  return wrk.format("GET", path)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

impl Wrk {
    /// [`run`](Self::run), with the hit ratio and loads of `namespace` during the run.
    async fn cached(
        &self,
        client: &Client,
        statements: &Statements<'_>,
        namespace: &str,
        name: &str,
        paths: &[String],
        method: Option<&str>,
    ) -> anyhow::Result<Row> {
        let before = client.cache_stats(namespace).await?;
        let statements_before = statements.now().await?;
        let mut row = self.run(name, paths, method)?;
        let statements_after = statements.now().await?;
        let after = client.cache_stats(namespace).await?;
        let ran = statements_before
            .zip(statements_after)
            .map(|((before, _), (after, _))| after - before);
        annotate_cache(&mut row, &before, &after, ran);
        Ok(row)
    }

    fn run(&self, name: &str, paths: &[String], method: Option<&str>) -> anyhow::Result<Row> {
        eprintln!("bench: {name}");
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let paths_file = self.work.join(format!("{slug}.paths"));
        std::fs::write(&paths_file, paths.join("\n") + "\n")?;
        let script = self.work.join(format!("{slug}.lua"));
        let header = format!(
            "local PATHS_FILE = {:?}\nlocal METHOD = {:?}\nlocal AUTHORIZATION = {:?}\nlocal THREADS = {WRK_THREADS}\n",
            paths_file.display().to_string(),
            method.unwrap_or("GET"),
            format!("Bearer {}", self.token),
        );
        std::fs::write(&script, header + WRK_SCRIPT)?;
        let output = Command::new(&self.bin)
            .args(["-t", &WRK_THREADS.to_string()])
            .args(["-c", &self.connections.to_string()])
            .args(["-d", &format!("{}s", self.seconds), "--timeout", "5s", "-s"])
            .arg(&script)
            .arg(&self.base)
            .stdin(Stdio::null())
            .output()
            .context("running wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let result = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .with_context(|| {
                format!(
                    "wrk printed no result for {name}: {}{}",
                    stdout,
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        let r: Value = serde_json::from_str(result)?;
        let num = |k: &str| r[k].as_u64().unwrap_or(0);
        let requests = num("requests");
        Ok(Row {
            scenario: name.to_string(),
            requests,
            req_per_sec: requests as f64 / (num("duration_us").max(1) as f64 / 1e6),
            p50_ms: num("p50_us") as f64 / 1000.0,
            p99_ms: num("p99_us") as f64 / 1000.0,
            errors: num("status_errors") + num("socket_errors"),
            ratio_to_baseline: None,
            notes: String::new(),
        })
    }
}
