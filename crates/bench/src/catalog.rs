//! `cascade-bench catalog`: the catalog's cached reads next to the same SQL sent straight to
//! PostgreSQL, in one run, so the ratio between them holds on any machine.
//!
//! It seeds a catalog (the tables are emptied first), serves it in-process on a loopback port
//! (the application `cascade serve` builds, with Redis as the shared tier under a key prefix of
//! its own), and measures each read over HTTP, then the same statement through the same pool.
//!
//! "PostgreSQL queries" are counted by PostgreSQL itself (pg_stat_statements, by the read's
//! tag, see [`crate::statements`]) when it can: for the embedded PostgreSQL the extension is
//! preloaded first; an external server must have it already. Otherwise a cached case counts
//! the cache loader's runs (each catalog read is exactly one statement) and a direct case one
//! query per request, as before the counts were measured.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cascade_catalog::config::{ASSETS, BUNDLES};
use cascade_catalog::queries;
use cascade_catalog::seed::{SeedOptions, seed};
use cascade_core::cache::{Cache, NamespaceStats};
use cascade_core::config::{CacheBackend, DatabaseSource, Secret};
use cascade_core::db::{Db, EmbeddedPostgres};
use cascade_core::redis::Redis;
use cascade_http::AppState;
use cascade_server::{Application, BuildOptions, Settings};

use crate::measure::{Case, measure};
use crate::statements::{self, Statements};

/// What `cascade-bench catalog` measures.
pub struct Options {
    pub assets: usize,
    pub requests: usize,
    pub concurrency: usize,
    pub hot: usize,
}

impl Options {
    /// A few seconds' run, for CI.
    pub const QUICK: Options = Options {
        assets: 2_000,
        requests: 2_000,
        concurrency: 8,
        hot: 200,
    };
}

/// One line of the table.
struct Row {
    case: Case,
    /// "HTTP + cache" or "PostgreSQL direct".
    via: &'static str,
    hit_ratio: Option<f64>,
    queries_per_1000: f64,
}

/// A measured read: its HTTP path, its cache namespace, and its statement for the direct case.
#[derive(Clone, Copy)]
enum Read {
    Asset,
    Bundle3,
}

impl Read {
    fn namespace(self) -> &'static str {
        match self {
            Read::Asset => ASSETS,
            Read::Bundle3 => BUNDLES,
        }
    }

    /// The statements a cached read's miss runs.
    fn tags(self) -> &'static [&'static str] {
        match self {
            Read::Asset => &[statements::ASSET],
            Read::Bundle3 => &[statements::BUNDLE_MEMBERS, statements::BUNDLE],
        }
    }

    fn path(self, version: &str) -> String {
        match self {
            Read::Asset => format!("/listings/{version}"),
            Read::Bundle3 => format!("/bundle?versionId={version}&depth=3"),
        }
    }

    /// The statement the cache loader runs, sent straight to PostgreSQL.
    async fn query(self, db: &Db, version: &str) {
        if let Ok(conn) = db.conn().await {
            let _ = match self {
                Read::Asset => queries::asset(&conn, version).await,
                Read::Bundle3 => queries::bundle(&conn, version, 3).await,
            };
        }
    }
}

/// Which version request `i` asks for.
type Pick = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// The seeded versions in a fixed shuffled order: the first `hot` are the hot set, the rest
/// are read once each by the miss-heavy case.
struct Versions {
    hot: Pick,
    cold: Pick,
    hot_count: usize,
    cold_count: usize,
}

/// What the cases share: the running application and how to count its statements.
struct Bench {
    state: AppState,
    base: String,
    http: reqwest::Client,
    statements: Option<Statements>,
    concurrency: usize,
}

pub async fn run(mut settings: Settings, options: Options) -> anyhow::Result<ExitCode> {
    let Some(redis_config) = settings.core.redis.clone() else {
        eprintln!(
            "cascade-bench: catalog needs REDIS_URL (bench/catalog.sh starts a private redis-server for it)"
        );
        return Ok(ExitCode::from(2));
    };
    let redis = Redis::new(&redis_config)?;
    anyhow::ensure!(
        redis.health().await.up,
        "Redis at {} does not answer",
        redis.display()
    );
    if let DatabaseSource::Embedded { data_dir } = &settings.core.database.source {
        preload_statements(data_dir, settings.core.database.startup_timeout).await?;
    }
    // Nothing signs a token in this run; a throwaway key keeps the application from warning.
    let key = format!("{:032x}", fastrand::u128(..)).repeat(2);
    settings
        .core
        .auth
        .jwt_secret
        .get_or_insert_with(|| Secret::new(key));
    settings.core.cache.backend = CacheBackend::Redis;
    settings.core.cache.key_prefix = format!("bench-catalog:{}:", std::process::id());
    let app = Application::build(settings, BuildOptions::default()).await?;
    let state = app.state.clone();
    let seeded = seed_catalog(&state.db, options.assets).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async move {
        let _ = stopped.await;
    }));
    let result = async {
        seeded?;
        let bench = Bench {
            statements: Statements::open(state.db.maintenance_config()).await?,
            http: cascade_core::upstream::http_client(
                Duration::from_secs(2),
                Duration::from_secs(30),
            )?,
            state,
            base,
            concurrency: options.concurrency.max(1),
        };
        let versions = versions(&bench.state.db, options.hot).await?;
        bench.warm(&versions).await?;
        let rows = bench.cases(&versions, options.requests).await?;
        print_table(&options, &versions, &rows, bench.statements.is_some());
        Ok(ExitCode::SUCCESS)
    }
    .await;
    let _ = stop.send(());
    server.await??;
    result
}

/// Preloads pg_stat_statements into the embedded PostgreSQL, then stops it again: the
/// application starts it as usual, now counting statements.
async fn preload_statements(data_dir: &std::path::Path, timeout: Duration) -> anyhow::Result<()> {
    let mut pg = EmbeddedPostgres::start(data_dir, timeout).await?;
    if !statements::preload(&mut pg, data_dir).await? {
        eprintln!("cascade-bench: pg_stat_statements unavailable; counting the cache's loads");
    }
    tokio::task::block_in_place(|| pg.stop());
    Ok(())
}

async fn seed_catalog(db: &Db, assets: usize) -> anyhow::Result<()> {
    let report = seed(
        db,
        &SeedOptions {
            assets,
            producers: (assets / 2_000).clamp(1, 50),
            seed: 1,
            reset: true,
            owner: None,
        },
    )
    .await
    .context("seeding the catalog")?;
    cascade_catalog::seed::vacuum(db).await;
    println!(
        "seeded {} assets, {} lineage edges, {} receipts, {} policies, {} producers in {:.1}s",
        report.assets,
        report.edges,
        report.receipts,
        report.policies,
        report.producers,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

async fn versions(db: &Db, hot: usize) -> anyhow::Result<Versions> {
    let mut all: Vec<String> = db
        .conn()
        .await?
        .query("SELECT version_id FROM assets ORDER BY version_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    fastrand::Rng::with_seed(7).shuffle(&mut all);
    let hot_count = hot.clamp(1, all.len().max(2) / 2);
    let cold_count = all.len().saturating_sub(hot_count);
    let all = Arc::new(all);
    let hot: Pick = {
        let all = all.clone();
        Arc::new(move |i: usize| all[i % hot_count].clone())
    };
    let cold: Pick = Arc::new(move |i: usize| all[hot_count + i % cold_count.max(1)].clone());
    Ok(Versions {
        hot,
        cold,
        hot_count,
        cold_count,
    })
}

impl Bench {
    /// Reads the hot sets (asset details and depth-3 bundles) so they are cached: twice, a
    /// second apart. A cold read that loaded speculatively in a Redis's first second (its
    /// tombstones not yet complete) or while speculation paused caches nothing; the second
    /// pass caches those.
    async fn warm(&self, versions: &Versions) -> anyhow::Result<()> {
        for pass in 0..2 {
            if pass > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
            }
            for i in 0..versions.hot_count {
                for read in [Read::Asset, Read::Bundle3] {
                    let url = format!("{}{}", self.base, read.path(&(versions.hot)(i)));
                    self.http.get(url).send().await?.bytes().await?;
                }
            }
        }
        // The second pass's speculative stores land after its answers.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        Ok(())
    }

    /// Each read over HTTP and direct, the cached row first.
    async fn cases(&self, versions: &Versions, requests: usize) -> anyhow::Result<Vec<Row>> {
        let cold_requests = requests.min(versions.cold_count);
        let mut rows = Vec::new();
        for (read, label, requests, pick) in [
            (
                Read::Asset,
                "asset details, hot set",
                requests,
                &versions.hot,
            ),
            (
                Read::Asset,
                "asset details, miss-heavy (every request a new version)",
                cold_requests,
                &versions.cold,
            ),
            (
                Read::Bundle3,
                "bundle depth 3, hot set",
                requests,
                &versions.hot,
            ),
        ] {
            rows.push(self.over_http(label, read, requests, pick.clone()).await?);
            rows.push(self.direct(label, read, requests, pick.clone()).await?);
        }
        Ok(rows)
    }

    /// `requests` GETs through the server, with the hit ratio of the read's namespace and the
    /// statements (or loads) it cost.
    async fn over_http(
        &self,
        name: &'static str,
        read: Read,
        requests: usize,
        pick: Pick,
    ) -> anyhow::Result<Row> {
        let (http, base) = (self.http.clone(), self.base.clone());
        let before = namespace(&self.state.cache, read.namespace());
        let ran_before = self.calls(read).await?;
        let case = measure(name, requests, self.concurrency, move |i| {
            let (http, url) = (http.clone(), format!("{base}{}", read.path(&pick(i))));
            async move { get(&http, &url).await }
        })
        .await;
        let ran = self.calls(read).await?.zip(ran_before).map(|(a, b)| a - b);
        let after = namespace(&self.state.cache, read.namespace());
        let served = self.served(requests);
        let hits = (after.near_hits + after.shared_hits) - (before.near_hits + before.shared_hits);
        let queries = ran.unwrap_or(after.loads - before.loads);
        Ok(Row {
            case,
            via: "HTTP + cache",
            hit_ratio: Some(hits as f64 / served),
            queries_per_1000: queries as f64 * 1000.0 / served,
        })
    }

    /// The same statement through the same pool, no cache.
    async fn direct(
        &self,
        name: &'static str,
        read: Read,
        requests: usize,
        pick: Pick,
    ) -> anyhow::Result<Row> {
        let db = self.state.db.clone();
        let ran_before = self.calls(read).await?;
        let case = measure(name, requests, self.concurrency, move |i| {
            let (version, db) = (pick(i), db.clone());
            async move { read.query(&db, &version).await }
        })
        .await;
        let ran = self.calls(read).await?.zip(ran_before).map(|(a, b)| a - b);
        let served = self.served(requests);
        Ok(Row {
            case,
            via: "PostgreSQL direct",
            hit_ratio: None,
            queries_per_1000: ran.map_or(1000.0, |n| n as f64 * 1000.0 / served),
        })
    }

    /// Calls so far of `read`'s statements, when PostgreSQL counts them.
    async fn calls(&self, read: Read) -> anyhow::Result<Option<u64>> {
        match &self.statements {
            Some(statements) => {
                let mut calls = 0;
                for tag in read.tags() {
                    calls += statements.calls(tag).await?;
                }
                Ok(Some(calls))
            }
            None => Ok(None),
        }
    }

    /// Requests [`measure`] actually sends: each task its equal share.
    fn served(&self, requests: usize) -> f64 {
        (requests / self.concurrency * self.concurrency).max(1) as f64
    }
}

async fn get(http: &reqwest::Client, url: &str) {
    match http.get(url).send().await {
        Ok(response) if response.status().is_success() => {
            let _ = response.bytes().await;
        }
        Ok(response) => tracing::warn!(status = %response.status(), url, "bench request failed"),
        Err(err) => tracing::warn!(error = %err, url, "bench request failed"),
    }
}

fn namespace(cache: &Cache, name: &str) -> NamespaceStats {
    cache
        .stats()
        .into_iter()
        .find(|s| s.namespace == name)
        .unwrap_or_default()
}

fn print_table(options: &Options, versions: &Versions, rows: &[Row], counted: bool) {
    println!(
        "cascade-bench catalog: {} assets, {} requests per case ({} for the miss-heavy pair), {} concurrent clients, hot set of {}",
        options.assets,
        options.requests,
        options.requests.min(versions.cold_count),
        options.concurrency,
        versions.hot_count
    );
    println!(
        "PostgreSQL queries counted by {}",
        if counted {
            "PostgreSQL (pg_stat_statements)"
        } else {
            "the cache's loads (pg_stat_statements unavailable); direct cases send one per request"
        }
    );
    println!();
    println!("| case | req/s | p50 | p99 | hit ratio | PostgreSQL queries per 1,000 requests |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} — {} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.0} |",
            row.case.name,
            row.via,
            row.case.ops_per_sec,
            row.case.p50.as_secs_f64() * 1e3,
            row.case.p99.as_secs_f64() * 1e3,
            row.hit_ratio
                .map(|r| format!("{:.1} %", r * 100.0))
                .unwrap_or_else(|| "—".into()),
            row.queries_per_1000
        );
    }
}
