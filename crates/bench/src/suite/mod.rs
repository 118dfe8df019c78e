//! The whole benchmark suite, in one run, on this machine (`cascade-bench`, `bench/run`).
//!
//! It starts what it needs (a private PostgreSQL, a private `redis-server`, and
//! `cascade-bench serve` as a separate process), seeds a catalog, and measures each scenario
//! with `wrk` (throughput and latency) or, where correctness is measured too, with its own
//! client:
//!
//! | scenario | what |
//! |---|---|
//! | ceiling | a bare axum server (`cascade-bench bare`, its own process, no middleware) returning a fixed body of an asset's size: what the machine's HTTP path gives |
//! | baseline | the same server stack returning that fixed body: the ceiling minus it is what the middleware costs |
//! | hot reads | `GET /listings/{id}` over a small warm set (all hits) |
//! | miss-heavy reads | `GET /listings/{id}` walking every asset |
//! | PostgreSQL reads | the same query as `GET /listings/{id}`, straight to PostgreSQL, no cache |
//! | bundle depth 3 | `GET /bundle?versionId=…&depth=3` over a warm set, and straight to PostgreSQL |
//! | writes | `PATCH /listings/{id}`: a write plus its invalidations, with a staleness probe beside wrk |
//! | primary + replica | hot reads, the miss-heavy walk and writes again, against a server on a primary and a streaming replica (`DATABASE_REPLICA_URLS`): which server ran the catalog's reads, no stale read |
//! | Redis Cluster | hot reads, the miss-heavy walk and writes again, against a server on the same PostgreSQL with its cache and bus on a Redis Cluster of 3 masters and 3 replicas (`REDIS_CLUSTER_URLS`): hits from the cluster, Redis errors, no stale read; then a master SIGKILLed under reads and writes (failed and stale reads, failed and slowest writes, time to promotion) |
//! | citizens | `GET /citizens/{u}` hot (cached) and cold (Venice, played by a stand-in in this process, answering in 20 ms): upstream calls per 1000 requests |
//! | stampede | 1000 concurrent requests for one cold key: PostgreSQL queries counted |
//! | spaces | one client per connection joining and leaving spaces with fewer places than clients: throughput, p99, no space above its limit |
//! | stripe webhooks | signed events posted to `POST /webhooks/stripe` (Stripe played by the test kit's stand-in in this process): events/s and p99 with 10 % duplicates, all new, all duplicates, and the dedupe insert alone |
//! | real time | WebSocket connections held by one instance and the server's memory per idle one; a broadcast to many subscribers of one channel (delivered/s, publish-to-delivery p50/p99), on one instance and through two |
//! | executions | the agents module's queue end to end (enqueue → claim → echo step → complete) by `cascade-bench worker` processes: executions/s with 1 and 4 workers, pickup latency at a steady rate, and the throughput run with worker processes SIGKILLed and restarted (every execution succeeded, each completed once) |
//! | three instances | three servers on one PostgreSQL and one Redis (docs/deploy.md's topology A), the suite's client reading round-robin over them while one writer writes through the first, each read checked against the writes acknowledged before it (read-your-writes across instances); then Redis killed under that traffic (failed and stale reads, time until every instance serves shared-tier hits again), and one instance SIGKILLed, skipped while down, started again (the other two's failed and stale reads, its own stale reads once back) |
//! | Redis outage | Redis killed for 10 s under load: failed requests, stale reads, recovery |
//! | PostgreSQL restart | PostgreSQL stopped for 10 s under load: how fast refusals come, no acknowledged write lost, recovery |
//!
//! Every scenario is one function taking the [`Suite`] (the running servers, the suite's
//! client, the seeded versions), so one can be changed or added without reading the others.
//! The table is printed and written to `<out>/results.{json,md}`.

mod ceiling;
mod citizens;
mod client;
mod cluster;
mod executions;
mod freshness;
mod instances;
mod pg_restart;
mod pgbench;
mod realtime;
mod redis_outage;
mod replica;
mod report;
mod seed003;
mod server;
mod spaces;
mod stampede;
mod throughput;
mod webhooks;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use cascade_core::db::EmbeddedPostgres;
use cascade_server::{Application, BuildOptions, Settings};
use cascade_testkit::{RedisServer, StripeStandin, VeniceStandin};

use self::client::Client;
use self::report::Report;
use self::server::{RedisAt, ServerProc};
use self::wrk::Wrk;
use crate::statements::{self, Statements};

/// What the suite was asked to do.
pub struct Options {
    /// A few seconds in all: small catalog, short runs. For CI, so the suite cannot rot.
    pub quick: bool,
    pub assets: Option<usize>,
    pub seconds: Option<u64>,
    pub connections: usize,
    pub out: PathBuf,
    /// Only this scenario (`realtime`, `ws-memory`, `executions`, `miss`, `throughput`,
    /// `writes`, `replica`, `cluster`, `instances`).
    pub only: Option<String>,
}

/// The account that owns the seeded producers, so the suite's writes are authorised as a
/// user's would be.
const BENCH_ACCOUNT: &str = "bench";

/// What every scenario works with. Fields drop in declaration order, so on an early error
/// the server stops before the PostgreSQL and Redis it depends on.
struct Suite {
    /// Held, not read: dropping it stops the server.
    /// The server under test (dropping it stops it).
    server: ServerProc,
    /// The suite's own requests, authorised as [`BENCH_ACCOUNT`].
    client: Client,
    wrk: Wrk,
    /// PostgreSQL's own count of the catalog's statements; `None` without pg_stat_statements.
    statements: Option<Statements>,
    /// Venice, played in this process: it counts the server's calls.
    venice: VeniceStandin,
    /// Stripe, played in this process (the server's `STRIPE_API_URL`).
    _stripe: StripeStandin,
    /// The run's scratch directory (servers' logs).
    work: PathBuf,
    redis: RedisServer,
    /// The embedded PostgreSQL (what `cascade serve` starts without DATABASE_URL: default
    /// settings, fsync on, a clean "fast" stop), which the restart scenario stops and starts
    /// in place. The test kit's `PgServer` (fsync off, 16 MB of shared buffers, SIGKILL) would
    /// measure a different database and a crash rather than a restart.
    pg: EmbeddedPostgres,
    pg_dir: PathBuf,
    /// Every seeded version, in order.
    ids: Vec<String>,
    /// 100 versions spread over the catalog, read warm by the hot scenarios.
    hot: Vec<String>,
    quick: bool,
}

pub async fn run(options: Options) -> anyhow::Result<ExitCode> {
    let wrk = which("wrk")
        .context("wrk is not installed: run bench/run (it installs it), or apt-get install wrk")?;
    // The miss-heavy walk needs the full catalog to be a walk, whatever the topology.
    let full_catalog = ["miss", "throughput", "writes", "replica", "cluster"];
    let small = options.quick
        || options
            .only
            .as_deref()
            .is_some_and(|only| !full_catalog.contains(&only));
    let assets = options
        .assets
        .unwrap_or(if small { 2_000 } else { 100_000 });
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
    let mut suite = Suite::start(&options, &work, wrk, seconds).await?;
    eprintln!("bench: seeding {assets} assets");
    suite.seed(assets).await?;

    let rows = if options.only.as_deref() == Some("realtime") {
        realtime_rows(&suite).await?
    } else if options.only.as_deref() == Some("ws-memory") {
        vec![realtime::memory(&suite).await?]
    } else if options.only.as_deref() == Some("executions") {
        executions::run(&suite).await?
    } else if options.only.as_deref() == Some("miss") {
        throughput::run_miss(&suite).await?
    } else if options.only.as_deref() == Some("throughput") {
        throughput::run(&suite).await?
    } else if options.only.as_deref() == Some("writes") {
        throughput::run_writes(&suite).await?
    } else if options.only.as_deref() == Some("replica") {
        let mut rows = throughput::run_single_node(&suite).await?;
        rows.extend(replica::run(&suite, &rows, assets).await?);
        rows
    } else if options.only.as_deref() == Some("instances") {
        instances::run(&mut suite).await?
    } else if options.only.as_deref() == Some("cluster") {
        let mut rows = throughput::run_single_node(&suite).await?;
        rows.extend(cluster::run(&suite, &rows).await?);
        rows
    } else {
        let mut rows = throughput::run(&suite).await?;
        // A second PostgreSQL, its replica, a catalog and a server: longer than a quick
        // run's rows together, so `--only replica` runs them there. The cluster's six
        // processes, its server and its four rows add ~17 s to a quick run (debug build):
        // `--only cluster` runs them there too.
        if !options.quick {
            rows.extend(replica::run(&suite, &rows, assets).await?);
            rows.extend(cluster::run(&suite, &rows).await?);
        }
        let citizens = citizens::run(&suite).await?;
        rows.extend(throughput::with_ratios(&rows, citizens));
        rows.push(stampede::run(&suite).await?);
        rows.push(spaces::run(&suite).await?);
        rows.extend(webhooks::run(&suite).await?);
        rows.extend(realtime_rows(&suite).await?);
        rows.extend(executions::run(&suite).await?);
        // Two more servers and three drills of a few outage times each: `--only instances`
        // runs them in a quick run.
        if !options.quick {
            rows.extend(instances::run(&mut suite).await?);
        }
        rows.push(redis_outage::run(&mut suite).await?);
        rows.push(pg_restart::run(&mut suite).await?);
        rows
    };

    let report = Report {
        assets,
        seconds,
        connections: options.connections,
        quick: options.quick,
        rows,
    };
    println!("{}", report.markdown());
    report.write(&options.out)?;
    eprintln!("bench: wrote {}/results.{{md,json}}", options.out.display());
    drop(suite);
    let _ = std::fs::remove_dir_all(&work);
    Ok(ExitCode::SUCCESS)
}

/// The real-time rows, with a second instance on the same PostgreSQL and Redis for the
/// fan-out through two (stopped afterwards).
async fn realtime_rows(suite: &Suite) -> anyhow::Result<Vec<report::Row>> {
    let mut second = suite.another_server("server-b", &[])?;
    second.wait_ready(Duration::from_secs(120)).await?;
    // The same broadcast with writes at most every 5 ms, for the write delay's effect.
    let mut delayed = suite.another_server("server-c", &[("WS_WRITE_DELAY", "5ms")])?;
    delayed.wait_ready(Duration::from_secs(120)).await?;
    realtime::run(suite, &second, &delayed).await
}

impl Suite {
    /// PostgreSQL (counting statements when it can) and Redis of our own, then the server on
    /// them, and the bench account registered.
    async fn start(
        options: &Options,
        work: &Path,
        wrk: PathBuf,
        seconds: u64,
    ) -> anyhow::Result<Suite> {
        let pg_dir = work.join("pg");
        let mut pg = EmbeddedPostgres::start(&pg_dir, Duration::from_secs(120)).await?;
        let statements = if statements::preload(&mut pg, &pg_dir).await? {
            Statements::open(&pg.pg_config()).await?
        } else {
            None
        };
        if statements.is_none() {
            eprintln!("bench: pg_stat_statements unavailable; counting the cache's loads instead");
        }
        let redis = RedisServer::start().await;
        let venice = VeniceStandin::start(citizens::citizens(seconds)).await;
        let stripe = StripeStandin::start().await;
        let mut server = ServerProc::start(
            work,
            "server",
            &pg.url(),
            RedisAt::Server(&redis.url()),
            &venice.url(),
            &stripe.url(),
            &[],
        )?;
        server.wait_ready(Duration::from_secs(120)).await?;
        let mut client = Client::new(&server.base)?;
        client.register(BENCH_ACCOUNT).await?;
        let wrk = Wrk {
            bin: wrk,
            base: server.base.clone(),
            work: work.to_path_buf(),
            seconds,
            connections: options.connections,
            token: client.token.clone(),
        };
        Ok(Suite {
            server,
            client,
            wrk,
            statements,
            venice,
            _stripe: stripe,
            work: work.to_path_buf(),
            redis,
            pg,
            pg_dir,
            ids: Vec::new(),
            hot: Vec::new(),
            quick: options.quick,
        })
    }

    /// Seeds `assets` owned by the bench account, then reads the hot set once so it is
    /// cached.
    async fn seed(&mut self, assets: usize) -> anyhow::Result<()> {
        self.ids = seed_database(self.pg.url(), assets).await?;
        self.hot = hot_set(&self.ids);
        warm(&self.client, &self.hot).await
    }

    /// The suite's server as the throughput scenarios measure it.
    fn target(&self) -> throughput::Target<'_> {
        throughput::Target {
            wrk: &self.wrk,
            client: &self.client,
            statements: self.statements.iter().collect(),
        }
    }

    /// One more server process on the suite's PostgreSQL, Redis and stand-ins.
    fn another_server(&self, name: &str, extra: &[(&str, &str)]) -> anyhow::Result<ServerProc> {
        self.server_on(
            name,
            &self.pg.url(),
            RedisAt::Server(&self.redis.url()),
            extra,
        )
    }

    /// One more server process on the suite's stand-ins, on the given PostgreSQL and Redis.
    fn server_on(
        &self,
        name: &str,
        database_url: &str,
        redis: RedisAt<'_>,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<ServerProc> {
        ServerProc::start(
            &self.work,
            name,
            database_url,
            redis,
            &self.venice.url(),
            &self._stripe.url(),
            extra,
        )
    }

    /// How long the outage scenarios keep a server down.
    fn outage(&self) -> Duration {
        Duration::from_secs(if self.quick { 2 } else { 10 })
    }

    /// Calls so far of the statements tagged `tag`, when PostgreSQL counts them.
    async fn calls(&self, tag: &str) -> anyhow::Result<Option<u64>> {
        match &self.statements {
            Some(statements) => Ok(Some(statements.calls(tag).await?)),
            None => Ok(None),
        }
    }
}

/// Seeds `assets` owned by the bench account in the database at `database_url` (through
/// the application `cascade seed` builds, in this process); every version, in order.
async fn seed_database(database_url: String, assets: usize) -> anyhow::Result<Vec<String>> {
    let settings = Settings::from_vars(&[
        ("DATABASE_URL", database_url),
        // Signs nothing (the seed issues no token); set so the application does not warn.
        (
            "JWT_SECRET",
            format!("{:032x}", fastrand::u128(..)).repeat(2),
        ),
    ])
    .map_err(anyhow::Error::msg)?;
    let app = Application::build(
        settings,
        BuildOptions {
            migrate: false,
            ..BuildOptions::default()
        },
    )
    .await?;
    let seeded = seed_catalog(&app, assets).await;
    let ids = match seeded {
        Ok(()) => versions(&app).await,
        Err(err) => Err(err),
    };
    app.stop().await;
    let ids = ids?;
    if ids.len() < 100 {
        bail!("the seed produced {} assets; expected {assets}", ids.len());
    }
    Ok(ids)
}

/// 100 versions spread over the catalog.
fn hot_set(ids: &[String]) -> Vec<String> {
    let step = (ids.len() / 100).max(1);
    ids.iter().step_by(step).take(100).cloned().collect()
}

/// Reads the hot set through `client`'s server, so it is cached: twice, a second apart. A
/// cold read that loaded speculatively in a Redis's first second (its tombstones not yet
/// complete) or while speculation paused caches nothing; the second pass caches those.
async fn warm(client: &Client, hot: &[String]) -> anyhow::Result<()> {
    for pass in 0..2 {
        if pass > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
        }
        for id in hot {
            client.get_ok(&format!("/listings/{id}")).await?;
            client
                .get_ok(&format!("/bundle?versionId={id}&depth=3"))
                .await?;
        }
    }
    // The second pass's speculative stores land after its answers.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    Ok(())
}

async fn seed_catalog(app: &Application, assets: usize) -> anyhow::Result<()> {
    let owner = app
        .state
        .identity
        .find_user_id(BENCH_ACCOUNT)
        .await?
        .with_context(|| format!("no account {BENCH_ACCOUNT:?} to own the seeded producers"))?;
    let options = cascade_catalog::seed::SeedOptions {
        assets,
        producers: 20,
        seed: 42,
        reset: false,
        owner: Some(owner),
    };
    cascade_catalog::seed::seed(&app.state.db, &options)
        .await
        .context("seeding the catalog")?;
    cascade_catalog::seed::vacuum(&app.state.db).await;
    Ok(())
}

async fn versions(app: &Application) -> anyhow::Result<Vec<String>> {
    Ok(app
        .state
        .db
        .conn()
        .await?
        .query("SELECT version_id FROM assets ORDER BY version_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}
