//! Statements counted by PostgreSQL itself (`pg_stat_statements`), so that a benchmark's
//! "queries per 1,000 requests" is measured at the server rather than inferred from the
//! cache's own counters.
//!
//! A statement is recognised by the tag comment its text starts with (`/* catalog:asset */
//! SELECT …`, see `crates/catalog/src/queries.rs`), not by matching its SQL: the SQL can be
//! rewritten without the count silently dropping to zero. pg_stat_statements keeps the text of
//! a statement's first execution, comment included (checked on PostgreSQL 15 by the quick
//! suite's stampede row, which counts the asset lookup by its tag).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cascade_core::db::EmbeddedPostgres;

/// One asset's statement (the direct PostgreSQL read of the benchmark).
pub const ASSET: &str = "/* catalog:asset */";
/// `GET /listings/{version}`'s loader statement: concurrent misses share it (`= ANY($1)`).
pub const ASSETS: &str = "/* catalog:assets */";
/// `GET /bundle`'s statement.
pub const BUNDLE: &str = "/* catalog:bundle */";
/// The versions a bundle shows, read before its load (a bundle miss runs both).
pub const BUNDLE_MEMBERS: &str = "/* catalog:bundle_members */";
/// Any of the catalog's tagged reads.
pub const CATALOG: &str = "/* catalog:";
/// The primary's WAL position, as a replica read's fence and the replica health loop ask it
/// (`crates/core/src/db/replica.rs`): counted on the primary by the replica rows.
pub const WAL_POSITION: &str = "SELECT pg_current_wal_lsn()";
/// A replica's replay position, asked on the read's connection when what is known of it is
/// behind the read's fence: counted on the replica by the replica rows.
pub const REPLAY_POSITION: &str = "SELECT pg_last_wal_replay_lsn()";

/// How long one read of the counters may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// Makes the embedded PostgreSQL in `data_dir` count statements: preloads pg_stat_statements
/// (which costs one restart) and creates the extension. False, and nothing changed, when the
/// server's installation does not ship it (Debian's `postgresql` does).
pub async fn preload(pg: &mut EmbeddedPostgres, data_dir: &Path) -> anyhow::Result<bool> {
    let (db, driver) = connect(&pg.pg_config()).await?;
    let available: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'",
            &[],
        )
        .await?
        .get(0);
    if available == 0 {
        return Ok(false);
    }
    db.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        .await?;
    drop(db);
    driver.abort();
    tokio::task::block_in_place(|| pg.stop());
    *pg = EmbeddedPostgres::start(data_dir, Duration::from_secs(60)).await?;
    let (db, _driver) = connect(&pg.pg_config()).await?;
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    Ok(true)
}

/// Reads the calls of tagged statements in one database, over a connection of its own.
pub struct Statements {
    db: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Statements {
    /// Connects with `config`; `None` when pg_stat_statements cannot be read in that database
    /// (not created there, or not preloaded by the server).
    pub async fn open(config: &tokio_postgres::Config) -> anyhow::Result<Option<Statements>> {
        let (db, driver) = connect(config).await?;
        let readable = tokio::time::timeout(
            DEADLINE,
            db.query_one("SELECT count(*) FROM pg_stat_statements", &[]),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !readable {
            driver.abort();
            return Ok(None);
        }
        Ok(Some(Statements { db, driver }))
    }

    /// Calls so far of the statements whose text starts with `prefix`, in this database.
    pub async fn calls(&self, prefix: &str) -> anyhow::Result<u64> {
        let pattern = like_prefix(prefix);
        let row = tokio::time::timeout(
            DEADLINE,
            self.db.query_one(
                "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND query LIKE $1",
                &[&pattern],
            ),
        )
        .await
        .context("reading pg_stat_statements timed out")??;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}

/// A `LIKE` pattern matching the texts that start with `prefix` (its `%`, `_` and `\\` taken
/// literally: `pg_current_wal_lsn` has underscores).
fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

impl Drop for Statements {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One connection of its own (5 s to connect), driven by a task the caller aborts.
pub async fn connect(
    config: &tokio_postgres::Config,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let mut config = config.clone();
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, driver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_matched_literally() {
        assert_eq!(like_prefix(CATALOG), "/* catalog:%");
        assert_eq!(
            like_prefix(WAL_POSITION),
            "SELECT pg\\_current\\_wal\\_lsn()%"
        );
        assert_eq!(like_prefix("100%\\"), "100\\%\\\\%");
    }

    /// The replica rows count the read path's own statements by their text: each must be
    /// sent exactly so by the replica set, or its count would silently be zero.
    #[test]
    fn the_replica_statements_counted_are_those_the_read_path_sends() {
        let sql = include_str!("../../core/src/db/replica.rs");
        for text in [WAL_POSITION, REPLAY_POSITION] {
            assert!(sql.contains(&format!("\"{text}\"")), "{text}");
        }
    }

    /// The tags are counted here and written in the catalog's SQL: each must open exactly
    /// one statement there, or its count would silently be zero. (`GET /listings` and
    /// `GET /ready` are tagged too, though no benchmark counts them yet.)
    #[test]
    fn every_tag_opens_one_catalog_statement() {
        let sql = include_str!("../../catalog/src/queries.rs");
        for tag in [
            ASSET,
            ASSETS,
            BUNDLE,
            BUNDLE_MEMBERS,
            "/* catalog:listings */",
            "/* catalog:readiness */",
        ] {
            assert_eq!(sql.matches(&format!("\"{tag} ")).count(), 1, "{tag}");
            assert!(tag.starts_with(CATALOG), "{tag}");
        }
    }
}
