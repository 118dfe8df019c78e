//! A generated, realistic catalog (`cascade seed catalog`), used by the benchmark.
//!
//! Reproducible: the same `seed` gives the same names, metadata and lineage. Version ids depend
//! only on the asset's index (`<topic>-<index>`), so rerunning without `reset` skips what
//! exists (every insert is `ON CONFLICT DO NOTHING`) and adds what is missing.
//!
//! Lineage is a DAG: each asset takes 0 to 3 parents among the 2,000 assets before it (data
//! pipelines are mostly local: yesterday's table feeds today's). 90 % of assets get a receipt
//! and a policy; the rest miss one or the other, so readiness has something to report.

use std::time::{Duration, Instant};

use cascade_core::db::{Db, DbError};
use serde_json::json;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub assets: usize,
    pub producers: usize,
    pub seed: u64,
    /// Empty the catalog tables first.
    pub reset: bool,
    /// The account (`cascade_users.id`) that owns the generated producers and may change
    /// their assets over the API; `None` leaves them without an owner (read-only over the API).
    pub owner: Option<i64>,
}

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct SeedReport {
    pub producers: u64,
    pub assets: u64,
    pub edges: u64,
    pub receipts: u64,
    pub policies: u64,
    pub elapsed: Duration,
}

/// Rows per statement: large enough to amortise round trips, small enough for the statement
/// timeout of a pool connection.
const BATCH: usize = 5_000;
/// How far back an asset's parents may be.
const PARENT_WINDOW: usize = 2_000;

const TOPICS: &[&str] = &[
    "sales",
    "orders",
    "weather",
    "traffic",
    "payments",
    "sensors",
    "clicks",
    "inventory",
    "shipments",
    "prices",
    "reviews",
    "energy",
    "claims",
    "trades",
    "logs",
    "census",
];
const ADJECTIVES: &[&str] = &[
    "Hourly",
    "Daily",
    "Cleaned",
    "Aggregated",
    "Raw",
    "Enriched",
    "Deduplicated",
    "Regional",
    "Weekly",
    "Validated",
    "Sampled",
    "Forecast",
];
const NOUNS: &[&str] = &[
    "observations",
    "events",
    "snapshot",
    "features",
    "summary",
    "extract",
    "ledger",
    "index",
];
const REGIONS: &[&str] = &["eu-west", "us-east", "ap-south", "sa-east", "af-north"];
const FORMATS: &[&str] = &["parquet", "csv", "json", "avro"];
const COMPANIES: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
];

fn pick<'a>(rng: &mut fastrand::Rng, list: &[&'a str]) -> &'a str {
    list[rng.usize(..list.len())]
}

/// The version id of the `index`-th generated asset.
pub fn version_id(index: usize) -> String {
    format!("{}-{index:07}", TOPICS[index % TOPICS.len()])
}

fn query_error(err: tokio_postgres::Error) -> DbError {
    DbError::Query(err)
}

/// Fills the catalog. Runs in one transaction: a failed seed leaves nothing half-written.
pub async fn seed(db: &Db, options: &SeedOptions) -> Result<SeedReport, DbError> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(options.seed);
    let producers = options.producers.max(1);
    let mut conn = db.conn().await?;
    let tx = conn.transaction().await.map_err(query_error)?;
    // Bulk loading: the pool's statement timeout is for requests, not for this.
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(query_error)?;
    if options.reset {
        tx.batch_execute(
            "TRUNCATE lineage_edges, lineage_pending_edges, lineage_event_audit, receipts, \
             policies, assets, producers",
        )
        .await
        .map_err(query_error)?;
    }
    let mut report = SeedReport::default();

    let (ids, names): (Vec<String>, Vec<String>) = (0..producers)
        .map(|i| {
            let company = COMPANIES[i % COMPANIES.len()];
            (
                format!("producer-{i:04}"),
                format!("{company} Data {}", i / COMPANIES.len() + 1),
            )
        })
        .unzip();
    // The seed never writes into someone else's producer: one registered over the API under a
    // generated id (or seeded for another owner) stops it. Unowned seeded producers are given
    // to `--owner` when there is one.
    let taken: Option<String> = tx
        .query_opt(
            "SELECT producer_id FROM producers WHERE producer_id = ANY($1) \
             AND owner_id IS NOT NULL AND owner_id IS DISTINCT FROM $2 LIMIT 1",
            &[&ids, &options.owner],
        )
        .await
        .map_err(query_error)?
        .map(|row| row.get(0));
    if let Some(producer) = taken {
        return Err(DbError::Conflict(format!(
            "producer {producer:?} belongs to another account; seed with its owner as \
             --owner, or into another database"
        )));
    }
    report.producers = tx
        .query_one(
            "WITH upserted AS ( \
               INSERT INTO producers (producer_id, name, owner_id) \
               SELECT p, n, $3 FROM unnest($1::text[], $2::text[]) AS t(p, n) \
               ON CONFLICT (producer_id) DO UPDATE SET owner_id = $3 \
                 WHERE producers.owner_id IS NULL AND $3 IS NOT NULL \
               RETURNING xmax = 0 AS inserted \
             ) SELECT count(*) FILTER (WHERE inserted) FROM upserted",
            &[&ids, &names, &options.owner],
        )
        .await
        .map_err(query_error)?
        .get::<_, i64>(0) as u64;

    let mut start = 0;
    while start < options.assets {
        let end = (start + BATCH).min(options.assets);
        let mut batch = Batch::default();
        for index in start..end {
            batch.add(&mut rng, index, options.assets, producers);
        }
        report.assets += tx
            .execute(
                "INSERT INTO assets (version_id, producer_id, name, metadata, created_at) \
                 SELECT v, p, n, m::jsonb, now() - s * interval '1 second' \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) AS t(v, p, n, m, s) \
                 ON CONFLICT DO NOTHING",
                &[
                    &batch.versions,
                    &batch.producers,
                    &batch.names,
                    &batch.metadata,
                    &batch.age_seconds,
                ],
            )
            .await
            .map_err(query_error)?;
        report.edges += tx
            .execute(
                "INSERT INTO lineage_edges (parent_version_id, child_version_id) \
                 SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                &[&batch.parents, &batch.children],
            )
            .await
            .map_err(query_error)?;
        report.receipts += tx
            .execute(
                "INSERT INTO receipts (version_id, payer, amount) \
                 SELECT v, p, a FROM unnest($1::text[], $2::text[], $3::int8[]) AS t(v, p, a) \
                 WHERE NOT EXISTS (SELECT 1 FROM receipts r WHERE r.version_id = t.v)",
                &[&batch.receipt_versions, &batch.payers, &batch.amounts],
            )
            .await
            .map_err(query_error)?;
        report.policies += tx
            .execute(
                "INSERT INTO policies (version_id, document) \
                 SELECT v, d::jsonb FROM unnest($1::text[], $2::text[]) AS t(v, d) \
                 WHERE NOT EXISTS (SELECT 1 FROM policies p WHERE p.version_id = t.v)",
                &[&batch.policy_versions, &batch.documents],
            )
            .await
            .map_err(query_error)?;
        start = end;
    }
    tx.commit().await.map_err(query_error)?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// `VACUUM (ANALYZE)` of the tables [`seed`] fills, to run after it (and after emptying
/// the caches of what it replaced), as `pgbench -i` does after its load: a bulk load leaves
/// the tables' pages without their visibility bits and the tables due for autovacuum's first
/// pass, which would otherwise run (over every seeded row) in the first minute of traffic;
/// and the planner gets the new rows' statistics at once. The rows are in already: a failed
/// vacuum leaves them to autovacuum, as before, and is logged, not returned.
pub async fn vacuum(db: &Db) {
    if let Err(err) = vacuum_tables(db).await {
        tracing::warn!(
            error = %cascade_core::db::error_chain(&err),
            "VACUUM (ANALYZE) after the seed failed; autovacuum will get to the seeded tables"
        );
    }
}

/// On a connection of its own ([`Db::maintenance_config`]: PostgreSQL itself when
/// `DATABASE_DIRECT_URL` is given), since `VACUUM` cannot run in a transaction, with no
/// `statement_timeout` (a role's, as docs/deploy.md sets for PgBouncer, would cancel it on a
/// large catalog) and a `lock_timeout` (it waits for no other maintenance of the tables for
/// long), each set alone: statements sent together run as one transaction.
async fn vacuum_tables(db: &Db) -> Result<(), DbError> {
    let (client, connection) = db
        .maintenance_config()
        .connect(db.tls())
        .await
        .map_err(query_error)?;
    let driver = tokio::spawn(connection);
    let vacuumed = async {
        client.batch_execute("SET statement_timeout = 0").await?;
        client.batch_execute("SET lock_timeout = '30s'").await?;
        client
            .batch_execute("VACUUM (ANALYZE) producers, assets, lineage_edges, receipts, policies")
            .await
    }
    .await
    .map_err(query_error);
    drop(client);
    let _ = driver.await;
    vacuumed
}

/// One batch of generated rows, column by column (for `unnest`).
#[derive(Default)]
struct Batch {
    versions: Vec<String>,
    producers: Vec<String>,
    names: Vec<String>,
    metadata: Vec<String>,
    age_seconds: Vec<i64>,
    parents: Vec<String>,
    children: Vec<String>,
    receipt_versions: Vec<String>,
    payers: Vec<String>,
    amounts: Vec<i64>,
    policy_versions: Vec<String>,
    documents: Vec<String>,
}

impl Batch {
    fn add(&mut self, rng: &mut fastrand::Rng, index: usize, total: usize, producers: usize) {
        let version = version_id(index);
        let topic = TOPICS[index % TOPICS.len()];
        let (adjective, noun, region) =
            (pick(rng, ADJECTIVES), pick(rng, NOUNS), pick(rng, REGIONS));
        self.producers
            .push(format!("producer-{:04}", rng.usize(..producers)));
        self.names.push(format!("{adjective} {topic} {noun}"));
        self.metadata.push(
            json!({
                "description": format!("{adjective} {topic} {noun} for {region}, version {}", index % 7 + 1),
                "format": pick(rng, FORMATS),
                "region": region,
                "rows": rng.u64(1_000..50_000_000),
                "tags": [topic, region],
            })
            .to_string(),
        );
        // Published in index order, five minutes apart: the last one is the newest.
        self.age_seconds
            .push((total - index) as i64 * 300 + rng.i64(0..300));
        if index > 0 {
            let window = index.min(PARENT_WINDOW);
            let mut chosen = Vec::new();
            for _ in 0..rng.usize(0..=3) {
                let parent = index - 1 - rng.usize(..window);
                if !chosen.contains(&parent) {
                    chosen.push(parent);
                    self.parents.push(version_id(parent));
                    self.children.push(version.clone());
                }
            }
        }
        let roll = rng.u8(0..100);
        if roll >= 5 {
            self.receipt_versions.push(version.clone());
            self.payers.push(format!("buyer-{:05}", rng.u32(0..10_000)));
            self.amounts.push(rng.i64(100..1_000_000));
        }
        if !(5..10).contains(&roll) {
            self.policy_versions.push(version.clone());
            self.documents.push(
                json!({"license": pick(rng, &["CC-BY-4.0", "proprietary", "ODbL-1.0"]),
                       "retentionDays": rng.u32(30..3650)})
                .to_string(),
            );
        }
        self.versions.push(version);
    }
}
