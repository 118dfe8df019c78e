//! Versioned SQL migrations, embedded in the binary.
//!
//! Each migration runs in its own transaction that first takes a transaction-scoped advisory
//! lock, then checks whether the version is already recorded. Two instances starting at once
//! therefore serialise on the lock, and the second finds the work done: the schema is applied
//! exactly once and re-running is a no-op. A recorded migration whose SQL changed since is
//! refused rather than silently skipped.

use tokio_postgres::NoTls;

use super::DbError;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "cache_entries",
        sql: include_str!("../../migrations/0001_cache_entries.sql"),
    },
    Migration {
        version: 2,
        name: "cache_leases",
        sql: include_str!("../../migrations/0002_cache_leases.sql"),
    },
    Migration {
        version: 3,
        name: "identity",
        sql: include_str!("../../migrations/0003_identity.sql"),
    },
    Migration {
        version: 4,
        name: "catalog",
        sql: include_str!("../../migrations/0004_catalog.sql"),
    },
    Migration {
        version: 5,
        name: "catalog_owners",
        sql: include_str!("../../migrations/0005_catalog_owners.sql"),
    },
];

/// Arbitrary but fixed: the advisory lock key all Cascade instances agree on ("cascade" in ASCII).
const LOCK_KEY: i64 = 0x63_61_73_63_61_64_65;

/// What a migration run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<i64>,
    pub already_applied: Vec<i64>,
}

/// FNV-1a of the SQL: enough to notice an edited migration, with no extra dependency.
fn checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Applies every pending migration over a dedicated connection (no statement timeout).
pub async fn migrate(config: &tokio_postgres::Config) -> Result<MigrationReport, DbError> {
    migrate_list(config, MIGRATIONS).await
}

pub async fn migrate_list(
    config: &tokio_postgres::Config,
    migrations: &[Migration],
) -> Result<MigrationReport, DbError> {
    let (mut client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "migration connection ended with an error");
        }
    });

    let result = async {
        {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
            tx.batch_execute(
                "SET LOCAL statement_timeout = 0;
                 CREATE TABLE IF NOT EXISTS cascade_schema_migrations (
                     version    BIGINT PRIMARY KEY,
                     name       TEXT NOT NULL,
                     checksum   TEXT NOT NULL,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
            tx.commit().await?;
        }

        let mut report = MigrationReport::default();
        for migration in migrations {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
            tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
            let recorded = tx
                .query_opt(
                    "SELECT checksum FROM cascade_schema_migrations WHERE version = $1",
                    &[&migration.version],
                )
                .await?;
            let sum = checksum(migration.sql);
            match recorded {
                Some(row) => {
                    let recorded_sum: String = row.get(0);
                    if recorded_sum != sum {
                        return Err(DbError::Migration(format!(
                            "migration {} ({}) was edited after it was applied (checksum {recorded_sum} in the database, {sum} in this binary); add a new migration instead",
                            migration.version, migration.name
                        )));
                    }
                    report.already_applied.push(migration.version);
                }
                None => {
                    tx.batch_execute(migration.sql).await.map_err(|err| {
                        DbError::Migration(format!(
                            "migration {} ({}) failed: {}",
                            migration.version,
                            migration.name,
                            super::error_chain(&err)
                        ))
                    })?;
                    tx.execute(
                        "INSERT INTO cascade_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        &[&migration.version, &migration.name, &sum],
                    )
                    .await?;
                    tracing::info!(version = migration.version, name = migration.name, "migration applied");
                    report.applied.push(migration.version);
                }
            }
            tx.commit().await?;
        }
        Ok(report)
    }
    .await;

    drop(client);
    let _ = driver.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version, "{pair:?}");
        }
    }

    #[test]
    fn checksum_notices_an_edit() {
        assert_ne!(checksum("CREATE TABLE a ()"), checksum("CREATE TABLE b ()"));
        assert_eq!(checksum("x"), checksum("x"));
    }
}
