//! `cascade seed catalog` and `cascade bench catalog`.
//!
//! The benchmark seeds a catalog, serves it in-process on a loopback port with the Redis
//! cache, and measures each read over HTTP next to the same query sent straight to PostgreSQL
//! through the same pool, in one run. "PostgreSQL queries" of a cached case are the cache
//! loader's runs (each catalog read is exactly one SQL statement, see `queries.rs`), taken from
//! the engine's per-namespace counters; a direct case sends one query per request.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cascade_core::cache::{Backend, Cache, EngineOptions, NamespaceStats};
use cascade_core::config::Config;
use cascade_core::db::Db;
use cascade_core::redis::Redis;
use cascade_server::catalog::invalidation::{ASSETS, BUNDLES, LISTINGS, READY};
use cascade_server::catalog::queries;
use cascade_server::catalog::seed::{SeedOptions, SeedReport, seed};
use cascade_server::state::AppState;

use crate::bench::{Case, measure};
use crate::serve::{apply_migrations, open_database};

fn print_seed(report: &SeedReport) {
    println!(
        "seeded {} assets, {} lineage edges, {} receipts, {} policies, {} producers in {:.1}s",
        report.assets,
        report.edges,
        report.receipts,
        report.policies,
        report.producers,
        report.elapsed.as_secs_f64()
    );
}

/// The shared cache tier, when there is one to keep coherent with what the seed wrote.
async fn shared_cache(config: &Config, db: &Db) -> anyhow::Result<Option<Cache>> {
    use cascade_core::config::CacheBackend;
    let backend = match (config.cache.backend, &config.redis) {
        (CacheBackend::Redis, Some(redis)) => Backend::Redis(Redis::new(redis)?),
        (CacheBackend::Postgres, _) => Backend::Postgres(db.clone()),
        _ => return Ok(None),
    };
    Ok(Some(Cache::new(
        config.cache.clone(),
        backend,
        EngineOptions::default(),
    )))
}

/// `cascade seed catalog`: migrations, the generated rows, then the catalog's cache
/// namespaces are emptied so running servers do not keep serving what the seed replaced.
pub async fn seed_command(
    config: Config,
    mut options: SeedOptions,
    owner: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let database = open_database(&config).await?;
    apply_migrations(&database.db).await?;
    if let Some(username) = owner {
        let conn = database.db.conn().await?;
        let row = conn
            .query_opt(
                "SELECT id FROM cascade_users WHERE lower(username) = lower($1)",
                &[&username],
            )
            .await?;
        let Some(row) = row else {
            eprintln!("cascade: --owner: no account named {username:?} (register it first)");
            return Ok(ExitCode::from(2));
        };
        options.owner = Some(row.get(0));
    }
    let report = seed(&database.db, &options)
        .await
        .context("seeding the catalog")?;
    if let Some(cache) = shared_cache(&config, &database.db).await? {
        for namespace in [ASSETS, LISTINGS, BUNDLES, READY] {
            cache.invalidate_namespace(namespace).await;
        }
    }
    print_seed(&report);
    database.db.close();
    Ok(ExitCode::SUCCESS)
}

/// `cascade bench catalog` settings.
pub struct BenchOptions {
    pub assets: usize,
    pub requests: usize,
    pub concurrency: usize,
    pub hot: usize,
}

struct Row {
    case: Case,
    /// "HTTP + cache" or "PostgreSQL direct".
    via: &'static str,
    hit_ratio: Option<f64>,
    queries_per_1000: f64,
}

fn namespace(cache: &Cache, name: &str) -> NamespaceStats {
    cache
        .stats()
        .into_iter()
        .find(|s| s.namespace == name)
        .unwrap_or_default()
}

/// Which version a request asks for.
type Pick = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// A measured read: its HTTP path, and the same SQL for the direct case.
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

/// Measures `requests` GETs of `url(i)` through the server, with the hit ratio and loads of
/// `ns` over the run.
async fn over_http(
    name: &'static str,
    state: &AppState,
    ns: &str,
    options: &BenchOptions,
    requests: usize,
    url: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Row {
    let client =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))
            .expect("HTTP client");
    let before = namespace(&state.cache, ns);
    let case = measure(name, requests, options.concurrency, move |i| {
        let (client, url) = (client.clone(), url(i));
        async move {
            match client.get(&url).send().await {
                Ok(response) if response.status().is_success() => {
                    let _ = response.bytes().await;
                }
                Ok(response) => {
                    tracing::warn!(status = %response.status(), url, "bench request failed")
                }
                Err(err) => tracing::warn!(error = %err, url, "bench request failed"),
            }
        }
    })
    .await;
    let after = namespace(&state.cache, ns);
    let served = (requests / options.concurrency.max(1) * options.concurrency.max(1)).max(1) as f64;
    let hits = (after.near_hits + after.shared_hits) - (before.near_hits + before.shared_hits);
    let loads = after.loads - before.loads;
    Row {
        case,
        via: "HTTP + cache",
        hit_ratio: Some(hits as f64 / served),
        queries_per_1000: loads as f64 * 1000.0 / served,
    }
}

pub async fn bench_command(config: Config, options: BenchOptions) -> anyhow::Result<ExitCode> {
    let Some(redis_config) = config.redis.clone() else {
        eprintln!(
            "cascade: bench catalog needs REDIS_URL (bench/catalog.sh starts a private redis-server for it)"
        );
        return Ok(ExitCode::from(2));
    };
    let redis = Redis::new(&redis_config)?;
    anyhow::ensure!(
        redis.health().await.up,
        "Redis at {} does not answer",
        redis.display()
    );
    let database = open_database(&config).await?;
    let db = database.db.clone();
    apply_migrations(&db).await?;
    let report = seed(
        &db,
        &SeedOptions {
            assets: options.assets,
            producers: (options.assets / 2_000).clamp(1, 50),
            seed: 1,
            reset: true,
            owner: None,
        },
    )
    .await
    .context("seeding the catalog")?;
    print_seed(&report);

    let mut cache_config = config.cache.clone();
    cache_config.key_prefix = format!("bench-catalog:{}:", std::process::id());
    let cache = Cache::new(
        cache_config,
        Backend::Redis(redis.clone()),
        EngineOptions::default(),
    );
    let state = AppState::new(config, db.clone(), Some(redis), cache, Instant::now());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cascade_server::serve(
        listener,
        state.clone(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));

    // Versions in a fixed shuffled order: the first `hot` form the hot set, the rest are cold.
    let mut versions: Vec<String> = db
        .conn()
        .await?
        .query("SELECT version_id FROM assets ORDER BY version_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    fastrand::Rng::with_seed(7).shuffle(&mut versions);
    let hot_count = options.hot.clamp(1, versions.len().max(1) / 2);
    let versions = Arc::new(versions);
    let cold_count = versions.len() - hot_count;
    let cold_requests = options.requests.min(cold_count);
    let hot: Pick = {
        let v = versions.clone();
        Arc::new(move |i: usize| v[i % hot_count].clone())
    };
    let cold: Pick = {
        let v = versions.clone();
        Arc::new(move |i: usize| v[hot_count + i % cold_count.max(1)].clone())
    };

    // Warm the hot sets (asset details and depth-3 bundles).
    let warm =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))?;
    for i in 0..hot_count {
        for read in [Read::Asset, Read::Bundle3] {
            let url = format!("{base}{}", read.path(&hot(i)));
            warm.get(url).send().await?.bytes().await?;
        }
    }

    let mut rows = Vec::new();
    for (read, label, requests, pick) in [
        (
            Read::Asset,
            "asset details, hot set",
            options.requests,
            &hot,
        ),
        (
            Read::Asset,
            "asset details, miss-heavy (every request a new version)",
            cold_requests,
            &cold,
        ),
        (
            Read::Bundle3,
            "bundle depth 3, hot set",
            options.requests,
            &hot,
        ),
    ] {
        let (p, base) = (pick.clone(), base.clone());
        rows.push(
            over_http(
                label,
                &state,
                read.namespace(),
                &options,
                requests,
                move |i| format!("{base}{}", read.path(&p(i))),
            )
            .await,
        );
        let (p, db) = (pick.clone(), db.clone());
        let case = measure(label, requests, options.concurrency, move |i| {
            let (version, db) = (p(i), db.clone());
            async move { read.query(&db, &version).await }
        })
        .await;
        rows.push(Row {
            case,
            via: "PostgreSQL direct",
            hit_ratio: None,
            queries_per_1000: 1000.0,
        });
    }

    let _ = stop.send(());
    let _ = server.await;
    db.close();
    drop(database);

    println!(
        "cascade bench catalog: {} assets, {} requests per case ({} for the miss-heavy pair), {} concurrent clients, hot set of {}",
        options.assets, options.requests, cold_requests, options.concurrency, hot_count
    );
    println!();
    println!("| case | req/s | p50 | p99 | hit ratio | PostgreSQL queries per 1,000 requests |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
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
    Ok(ExitCode::SUCCESS)
}
