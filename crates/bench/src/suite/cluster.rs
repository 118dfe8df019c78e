//! The suite's hot reads, miss-heavy walk and writes once more, against a server whose cache
//! and bus are on a Redis Cluster (`REDIS_CLUSTER_URLS`), beside the single-node rows of the
//! same run (issue 19's benchmark).
//!
//! The cluster is the test kit's (`RedisCluster::start`: 3 masters, each with a replica, 6
//! `redis-server` processes; it panics when they cannot start), new and private to this group,
//! so its keys need no prefix of their own and nothing to flush. The server runs on the
//! suite's PostgreSQL and catalog (what the single-node rows read and wrote): its statements
//! are counted there as theirs are, and the rows differ from the single node's by where the
//! cache's shared tier and the bus are, nothing else. The suite's own server is idle
//! meanwhile; its cache does not hear the writes made here (another Redis), which no later
//! scenario reads back: the Redis outage's probe writes its asset before it checks a read.
//!
//! A fourth row kills a master under load: the stale-read probe (a writer and 16 readers,
//! through HTTP) runs while the master of the written asset's bucket is SIGKILLed and the
//! cluster promotes its replica (`cluster-node-timeout` 1 s in the test kit): failed and
//! stale reads, failed and slowest writes, how long the promotion took, the Redis errors the
//! server absorbed (served from PostgreSQL). The engine-level drill is
//! `crates/core/tests/cluster.rs`.

use std::time::{Duration, Instant};

use cascade_core::cache::buckets::{self, Buckets};
use cascade_testkit::RedisCluster;
use serde_json::Value;

use super::client::Client;
use super::freshness::{Probe, writes_note};
use super::report::Row;
use super::server::RedisAt;
use super::throughput::{self, Catalog, Target};
use super::{Suite, warm};

/// The rows' names: the single-node rows' scenarios, on the cluster.
const NAMES: [&str; 3] = [
    "hot reads, Redis Cluster 3+3",
    "miss-heavy reads, Redis Cluster 3+3",
    "writes, Redis Cluster 3+3",
];

/// The failover row's name.
const FAILOVER: &str = "Redis Cluster: a master killed under load";

/// Readers of the failover row's probe (beside its one writer).
const READERS: usize = 16;

/// The catalog's cache key name for an asset (`crates/catalog/src/config.rs`: its key is
/// `cache:asset:<versionId>`): the failover row kills the master of that key's bucket.
const ASSET_KEY: &str = "cache:asset";

/// How long the cluster may take to promote a replica (the test kit panics past it).
const PROMOTION_BOUND: Duration = Duration::from_secs(30);

/// The three rows, with their ratios to `rows`' ceiling and baseline (and the walk cut by
/// their direct PostgreSQL read's rate), then the failover row.
pub(super) async fn run(suite: &Suite, rows: &[Row]) -> anyhow::Result<Vec<Row>> {
    eprintln!("bench: a Redis Cluster, 3 masters and 3 replicas");
    // Declared before the server, so it is dropped after it.
    let mut cluster = RedisCluster::start(3, 1).await;
    let seeds = cluster.urls().join(",");
    let mut server = suite.server_on(
        "server-cluster",
        &suite.pg.url(),
        RedisAt::Cluster(&seeds),
        &[],
    )?;
    server.wait_ready(Duration::from_secs(120)).await?;
    // The same database and signing key: the bench account's token is good here.
    let mut client = Client::new(&server.base)?;
    client.token = suite.client.token.clone();
    warm(&client, &suite.hot).await?;

    let wrk = suite.wrk.against(&server.base, &client.token);
    let target = Target {
        wrk: &wrk,
        client: &client,
        statements: suite.statements.iter().collect(),
    };
    let catalog = Catalog {
        hot: &suite.hot,
        ids: &suite.ids,
    };
    let mut measured = throughput::run_beside(
        &target,
        &catalog,
        rows,
        NAMES,
        async || SharedTier::read(&client).await,
        |before, after| after.since(before),
    )
    .await?;
    measured.push(master_killed(suite, &mut cluster, &client).await?);
    Ok(measured)
}

/// The stale-read probe through `client`'s server while the master of the written asset's
/// bucket is SIGKILLed and its replica promoted.
async fn master_killed(
    suite: &Suite,
    cluster: &mut RedisCluster,
    client: &Client,
) -> anyhow::Result<Row> {
    eprintln!("bench: {FAILOVER}");
    let written = &suite.hot[0];
    let buckets = Buckets::new();
    let bucket = buckets.of(&format!("{ASSET_KEY}:{written}"));
    let slot = buckets::slot(buckets.tag(bucket).as_bytes());
    let lead = suite.outage() / 2;
    let before = SharedTier::read(client).await?;
    let started = Instant::now();
    let probe = Probe::start(client, &suite.hot, written, READERS);
    tokio::time::sleep(lead).await;
    let old = cluster.kill_master_of(slot);
    let killed = Instant::now();
    cluster.wait_for_master(slot, old, PROMOTION_BOUND).await;
    let promoted = killed.elapsed();
    tokio::time::sleep(lead).await;
    let mut seen = probe.stop().await?;
    let elapsed = started.elapsed();
    let after = SharedTier::read(client).await?;

    let failed_writes = seen.writes.iter().filter(|w| !w.ok).count() as u64;
    let notes = format!(
        "{} failed reads, {} stale reads of {} checked; {}; the replica promoted {} ms after \
         the kill; {}",
        seen.failed.saturating_sub(failed_writes),
        seen.stale,
        seen.checked,
        writes_note(&seen.writes, killed, "after the kill"),
        promoted.as_millis(),
        after.since(&before),
    );
    Ok(Row::from_latencies(
        FAILOVER.to_string(),
        &mut seen.latencies,
        elapsed,
        seen.failed,
        notes,
    ))
}

/// The cache's shared-tier counters over every namespace: what the cluster served, and the
/// Redis errors the engine absorbed (it served those requests from PostgreSQL).
struct SharedTier {
    hits: u64,
    errors: u64,
}

impl SharedTier {
    async fn read(client: &Client) -> anyhow::Result<SharedTier> {
        let health = client.health_db().await?;
        let sum = |field: &str| -> u64 {
            health["cache"]["namespaces"]
                .as_array()
                .map_or(0, |all| all.iter().map(|ns| counter(ns, field)).sum())
        };
        Ok(SharedTier {
            hits: sum("shared_hits"),
            errors: sum("shared_errors"),
        })
    }

    /// What the cluster did between `before` and this reading, as a row's note.
    fn since(&self, before: &SharedTier) -> String {
        format!(
            "{} hits from the cluster (shared tier), {} Redis errors",
            self.hits.saturating_sub(before.hits),
            self.errors.saturating_sub(before.errors),
        )
    }
}

fn counter(namespace: &Value, field: &str) -> u64 {
    namespace[field].as_u64().unwrap_or(0)
}
