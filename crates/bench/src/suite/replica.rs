//! The suite's hot reads, miss-heavy walk and writes once more, against a server on a
//! PostgreSQL primary with a streaming replica (`DATABASE_REPLICA_URLS`), beside the
//! single-node rows of the same run (issue 19's benchmark).
//!
//! The pair is the test kit's (`PgServer::start_primary_with`, `start_replica`: its
//! functions panic when PostgreSQL cannot start), run with the settings of the suite's own
//! PostgreSQL (memory, fsync, planner costs: [`COMPARED`]), so that the rows compare the
//! topology, not the tuning. The server has a Redis of its own, so neither server's cache or
//! bus serves the other, and the same catalog (the same seed) on the primary. Both servers
//! count statements (pg_stat_statements): each row says how many of the catalog's reads ran
//! on the replica and how many on the primary, and how many `pg_current_wal_lsn()` the
//! primary answered (the reads' fences, and the replica health loop's probes, 4 a second).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cascade_testkit::{PgServer, RedisServer};

use super::client::Client;
use super::report::Row;
use super::server::RedisAt;
use super::throughput::{self, Catalog, Target};
use super::{BENCH_ACCOUNT, Suite, hot_set, seed_database, warm};
use crate::statements::{self, Statements};

/// The rows' names: the single-node rows' scenarios, on the primary and its replica.
const NAMES: [&str; 3] = [
    "hot reads, primary + replica",
    "miss-heavy reads, primary + replica",
    "writes, primary + replica",
];

/// The suite's PostgreSQL settings the pair takes over: those the embedded cluster is tuned
/// with (`crates/core/src/db/embedded.rs`) and those the test kit sets otherwise (`fsync`,
/// `max_connections`).
const COMPARED: &[&str] = &[
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "wal_buffers",
    "checkpoint_completion_target",
    "max_wal_size",
    "random_page_cost",
    "effective_io_concurrency",
    "max_connections",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
];

/// How long the replica may take to join the server's rotation after the seed.
const ROTATION_BOUND: Duration = Duration::from_secs(60);

/// The three rows, with their ratios to `rows`' ceiling and baseline (and the walk cut by
/// their direct PostgreSQL read's rate).
pub(super) async fn run(suite: &Suite, rows: &[Row], assets: usize) -> anyhow::Result<Vec<Row>> {
    eprintln!("bench: a primary and a streaming replica");
    let mut settings = suite_settings(suite).await?;
    let counting = suite.statements.is_some();
    if counting {
        settings.push("shared_preload_libraries=pg_stat_statements".into());
    }
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let primary = PgServer::start_primary_with(&settings).await;
    let database_url = primary.fresh_database().await;
    let database = database_url
        .rsplit('/')
        .next()
        .context("a database URL without a name")?
        .to_string();
    if counting {
        // Made on the primary before the copy: the replica has it too.
        primary
            .client(&database)
            .await
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
    }
    let replica = primary.start_replica().await;
    let redis = RedisServer::start().await;
    let replica_url = replica.url(&database);
    let mut server = suite.server_on(
        "server-replica",
        &database_url,
        RedisAt::Server(&redis.url()),
        &[("DATABASE_REPLICA_URLS", &replica_url)],
    )?;
    server.wait_ready(Duration::from_secs(120)).await?;
    let mut client = Client::new(&server.base)?;
    client.register(BENCH_ACCOUNT).await?;
    eprintln!("bench: seeding {assets} assets on the primary");
    let ids = seed_database(database_url.clone(), assets).await?;
    let hot = hot_set(&ids);
    in_rotation(&client).await?;
    warm(&client, &hot).await?;

    let primary_statements = Statements::open(&database_url.parse()?).await?;
    let replica_statements = Statements::open(&replica_url.parse()?).await?;
    let counters = primary_statements.as_ref().zip(replica_statements.as_ref());
    let wrk = suite.wrk.against(&server.base, &client.token);
    let target = Target {
        wrk: &wrk,
        client: &client,
        statements: counters.map_or_else(Vec::new, |(p, r)| vec![p, r]),
    };
    let catalog = Catalog {
        hot: &hot,
        ids: &ids,
    };
    throughput::run_beside(
        &target,
        &catalog,
        rows,
        NAMES,
        async || Split::read(counters, &client).await,
        |before, after| after.since(before),
    )
    .await
}

/// The suite's PostgreSQL's values of [`COMPARED`], as `name=value`.
async fn suite_settings(suite: &Suite) -> anyhow::Result<Vec<String>> {
    let (db, driver) = statements::connect(&suite.pg.pg_config()).await?;
    let names: Vec<&str> = COMPARED.to_vec();
    let rows = tokio::time::timeout(
        Duration::from_secs(10),
        db.query(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1)",
            &[&names],
        ),
    )
    .await
    .context("reading the suite's PostgreSQL settings timed out")??;
    driver.abort();
    Ok(rows
        .iter()
        .map(|row| format!("{}={}", row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect())
}

/// Waits until the server has the replica in rotation (within `DATABASE_REPLICA_MAX_LAG` of
/// the primary, the seed replayed but for that).
async fn in_rotation(client: &Client) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let health = client.health_db().await?;
        let replicas = &health["replicas"];
        if replicas["in_rotation"].as_u64() == Some(1) {
            return Ok(());
        }
        if started.elapsed() > ROTATION_BOUND {
            bail!(
                "the replica did not join the server's rotation within {ROTATION_BOUND:?}: {}",
                replicas["replicas"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the catalog's reads ran, read before and after a row: by PostgreSQL on each server
/// when both count statements, else by the server (its replica's `reads` in `/health/db`).
struct Split {
    counted: Option<Counted>,
    /// Reads the server says the replica answered.
    served: u64,
}

struct Counted {
    on_replica: u64,
    on_primary: u64,
    /// `pg_current_wal_lsn()` on the primary: fences and health probes.
    wal_positions: u64,
    /// `pg_last_wal_replay_lsn()` asked by reads on the replica (its position known so far
    /// was behind the read's fence).
    replay_asks: u64,
}

impl Split {
    async fn read(
        counters: Option<(&Statements, &Statements)>,
        client: &Client,
    ) -> anyhow::Result<Split> {
        let counted = match counters {
            Some((primary, replica)) => Some(Counted {
                on_replica: replica.calls(statements::CATALOG).await?,
                on_primary: primary.calls(statements::CATALOG).await?,
                wal_positions: primary.calls(statements::WAL_POSITION).await?,
                replay_asks: replica.calls(statements::REPLAY_POSITION).await?,
            }),
            None => None,
        };
        let health = client.health_db().await?;
        let served = health["replicas"]["replicas"][0]["reads"]
            .as_u64()
            .unwrap_or(0);
        Ok(Split { counted, served })
    }

    /// What ran where between `before` and this reading, as a row's note.
    fn since(&self, before: &Split) -> String {
        match self.counted.as_ref().zip(before.counted.as_ref()) {
            Some((now, then)) => format!(
                "catalog reads: {} on the replica, {} on the primary; the primary answered {} \
                 pg_current_wal_lsn() (fences, health probes), the replica {} \
                 pg_last_wal_replay_lsn()",
                now.on_replica.saturating_sub(then.on_replica),
                now.on_primary.saturating_sub(then.on_primary),
                now.wal_positions.saturating_sub(then.wal_positions),
                now.replay_asks.saturating_sub(then.replay_asks),
            ),
            None => format!(
                "{} reads answered by the replica (the server's count; pg_stat_statements \
                 unavailable)",
                self.served.saturating_sub(before.served)
            ),
        }
    }
}
