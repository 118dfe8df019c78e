//! Versioned SQL migrations, embedded in the binary, one version space per module.
//!
//! The core and each application module own a list of migrations under their own module name,
//! numbered from 1. A module adds a migration without agreeing on numbers with anyone else, and
//! the core never needs to know which modules exist: the application hands [`migrate`] the
//! core's list first (modules build on its tables), then each module's, and they are applied
//! in that order.
//!
//! Each migration runs in its own transaction that first takes a transaction-scoped advisory
//! lock, then checks whether its `(module, version)` is already recorded. Two instances starting
//! at once therefore serialise on the lock, and the second finds the work done: the schema is
//! applied exactly once and re-running is a no-op. A recorded migration whose SQL changed since
//! is refused rather than silently skipped.
//!
//! Releases before module version spaces kept one global list (1, 2, 3, …) and keyed the
//! bookkeeping table by `version` alone. Such a database is upgraded in place, once, under the
//! same lock and in one transaction: each old row is re-keyed to the registered migration that
//! declares its number as [`Migration::legacy_version`]. A row nobody claims stops the upgrade
//! with nothing changed, because guessing its owner would later re-run or skip real schema.
//! There is no way back: in an upgraded table an older release finds version numbers twice
//! (`core/1` and `catalog/1`), so its migration run fails (and rolls back) instead of serving
//! on it. Stop old instances before the first new one starts.

use std::collections::HashMap;
use std::fmt;

use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, NoTls, Socket, Transaction};

use super::DbError;

/// One embedded migration of one module.
///
/// Lists are plain `&'static [Migration]` consts so a module declares its own next to its SQL:
///
/// ```
/// use cascade_core::db::Migration;
///
/// pub const MIGRATIONS: &[Migration] = &[
///     Migration::new("billing", 1, "invoices", "CREATE TABLE invoices (id BIGINT PRIMARY KEY)"),
/// ];
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The version space this migration belongs to. Half of the key recorded in the database,
    /// so a module's name never changes once one of its migrations has shipped.
    pub module: &'static str,
    /// Position within the module, from 1; strictly increasing along the module's list.
    pub version: i64,
    /// For logs and error messages; not part of the key.
    pub name: &'static str,
    pub sql: &'static str,
    /// The number this same migration had in the single global list of the releases before
    /// module version spaces: how a database made by them finds out which module owns each of
    /// its rows. `None` for every migration written since.
    pub legacy_version: Option<i64>,
}

impl Migration {
    /// A migration with no past in the global list (every new one).
    pub const fn new(
        module: &'static str,
        version: i64,
        name: &'static str,
        sql: &'static str,
    ) -> Self {
        Migration {
            module,
            version,
            name,
            sql,
            legacy_version: None,
        }
    }

    /// The same migration, declared as number `version` of the old global list.
    pub const fn legacy(self, version: i64) -> Self {
        Migration {
            legacy_version: Some(version),
            ..self
        }
    }

    pub fn id(&self) -> MigrationId {
        MigrationId {
            module: self.module,
            version: self.version,
        }
    }
}

/// `(module, version)`: the key of a migration, in the database as in the binary.
///
/// Prints as `module/version` under both `{}` and `{:?}`, so a report logged with `?` reads
/// `[core/1, core/2]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId {
    pub module: &'static str,
    pub version: i64,
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.module, self.version)
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The core's own migrations. Append only: never edit one that has shipped.
///
/// These were numbers 1 to 3 of the old global list as well, hence `legacy`.
pub const CORE_MIGRATIONS: &[Migration] = &[
    Migration::new(
        CORE_MODULE,
        1,
        "cache_entries",
        include_str!("../../migrations/0001_cache_entries.sql"),
    )
    .legacy(1),
    Migration::new(
        CORE_MODULE,
        2,
        "cache_leases",
        include_str!("../../migrations/0002_cache_leases.sql"),
    )
    .legacy(2),
    Migration::new(
        CORE_MODULE,
        3,
        "identity",
        include_str!("../../migrations/0003_identity.sql"),
    )
    .legacy(3),
    Migration::new(
        CORE_MODULE,
        4,
        "audit_log",
        include_str!("../../migrations/0004_audit_log.sql"),
    ),
    Migration::new(
        CORE_MODULE,
        5,
        "rate_limits",
        include_str!("../../migrations/0005_rate_limits.sql"),
    ),
    Migration::new(
        CORE_MODULE,
        6,
        "audit_log_owner",
        include_str!("../../migrations/0006_audit_log_owner.sql"),
    ),
    Migration::new(
        CORE_MODULE,
        7,
        "cache_invalidation_log",
        include_str!("../../migrations/0007_cache_invalidation_log.sql"),
    ),
];

/// The core's module name. Its list, when given, comes first: modules build on its tables.
const CORE_MODULE: &str = "core";

/// Arbitrary but fixed: the advisory lock key all Cascade instances agree on ("cascade" in ASCII).
/// Releases before module version spaces take the same key, so an old and a new instance
/// starting side by side still serialise.
const LOCK_KEY: i64 = 0x63_61_73_63_61_64_65;

/// What a migration run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<MigrationId>,
    pub already_applied: Vec<MigrationId>,
    /// Rows of a bookkeeping table from before module version spaces that this run re-keyed;
    /// 0 on every run after the one that upgraded the database.
    pub legacy_rows_rekeyed: u64,
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "applied {:?}, {} already applied",
            self.applied,
            self.already_applied.len()
        )?;
        if self.legacy_rows_rekeyed > 0 {
            write!(
                f,
                ", {} legacy bookkeeping row(s) re-keyed",
                self.legacy_rows_rekeyed
            )?;
        }
        Ok(())
    }
}

/// FNV-1a of the SQL: enough to notice an edited migration, with no extra dependency.
/// Databases record it, so it can never change.
fn checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Checks `lists` by the rules [`migrate`] enforces, without a database (for a module's unit
/// test of its own list next to [`CORE_MIGRATIONS`]): one module per list, versions strictly
/// increasing, a module name used by one list only, the core's list (if given) first, and each
/// old global number claimed at most once.
pub fn check_migrations(lists: &[&[Migration]]) -> Result<(), DbError> {
    Plan::parse(lists).map(drop)
}

/// Applies every pending migration of `lists`, in order, over a dedicated connection (no
/// statement timeout: a migration may rewrite a big table).
///
/// Each element of `lists` is one module's whole list, [`CORE_MIGRATIONS`] first:
/// `migrate(config, &[CORE_MIGRATIONS, billing::MIGRATIONS])`. Nothing touches the database
/// until the lists are known to be consistent (the rules of [`check_migrations`]).
pub async fn migrate(
    config: &tokio_postgres::Config,
    lists: &[&[Migration]],
) -> Result<MigrationReport, DbError> {
    migrate_with(config, NoTls, lists).await
}

/// [`migrate`] over TLS: `migrate_with(db.maintenance_config(), db.tls(), lists)` connects as
/// the pool does.
pub async fn migrate_with<T>(
    config: &tokio_postgres::Config,
    tls: T,
    lists: &[&[Migration]],
) -> Result<MigrationReport, DbError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let plan = Plan::parse(lists)?;
    let (mut client, connection) = config.connect(tls).await?;
    let driver = tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "migration connection ended with an error");
        }
    });
    let result = apply(&mut client, &plan).await;
    drop(client);
    let _ = driver.await;
    result
}

/// The registered lists, known to be consistent, in the order they are applied.
struct Plan<'a> {
    lists: Vec<&'a [Migration]>,
}

impl<'a> Plan<'a> {
    /// Refuses registrations that would make the recorded keys ambiguous: a list mixing modules,
    /// versions that do not strictly increase, a module name used by two lists, or an old
    /// global number claimed twice; together the first three make `(module, version)` unique.
    /// Also refuses the core's list after a module's, whose migrations may need its tables.
    /// Every problem is reported at once.
    fn parse(lists: &[&'a [Migration]]) -> Result<Plan<'a>, DbError> {
        let mut problems = Vec::new();
        let mut seen_modules = HashMap::new();
        let mut legacy_claims: HashMap<i64, MigrationId> = HashMap::new();
        for (position, list) in lists.iter().enumerate() {
            let Some(first) = list.first() else { continue };
            let module = first.module;
            if module.is_empty() {
                problems.push(format!("list {position} has an empty module name"));
            }
            if seen_modules.insert(module, position).is_some() {
                problems.push(format!(
                    "module {module:?} is registered by more than one list"
                ));
            }
            if module == CORE_MODULE && position > 0 {
                problems.push(format!(
                    "the {CORE_MODULE:?} list comes after a module's; it must come first"
                ));
            }
            for migration in list.iter() {
                if migration.module != module {
                    problems.push(format!(
                        "{} ({}) is in the list of module {module:?}; a list holds one module",
                        migration.id(),
                        migration.name
                    ));
                }
                if let Some(old) = migration.legacy_version
                    && let Some(other) = legacy_claims.insert(old, migration.id())
                {
                    problems.push(format!(
                        "legacy version {old} is claimed by both {other} and {}",
                        migration.id()
                    ));
                }
            }
            for pair in list.windows(2) {
                if pair[1].version <= pair[0].version {
                    problems.push(format!(
                        "module {module:?}: version {} ({}) follows version {} ({}); versions must strictly increase",
                        pair[1].version, pair[1].name, pair[0].version, pair[0].name
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(Plan {
                lists: lists.to_vec(),
            })
        } else {
            Err(DbError::Migration(format!(
                "invalid migration lists: {}",
                problems.join("; ")
            )))
        }
    }

    fn migrations(&self) -> impl Iterator<Item = &'a Migration> + '_ {
        self.lists.iter().flat_map(|list| list.iter())
    }

    /// The migration that was number `old` of the global list, if any is registered.
    fn claiming(&self, old: i64) -> Option<&'a Migration> {
        self.migrations().find(|m| m.legacy_version == Some(old))
    }
}

async fn apply(client: &mut Client, plan: &Plan<'_>) -> Result<MigrationReport, DbError> {
    let mut report = MigrationReport {
        legacy_rows_rekeyed: prepare_bookkeeping(client, plan).await?,
        ..MigrationReport::default()
    };
    for migration in plan.migrations() {
        let tx = locked(client).await?;
        let recorded = tx
            .query_opt(
                "SELECT checksum FROM cascade_schema_migrations WHERE module = $1 AND version = $2",
                &[&migration.module, &migration.version],
            )
            .await?;
        let sum = checksum(migration.sql);
        match recorded {
            Some(row) => {
                let recorded_sum: String = row.get(0);
                if recorded_sum != sum {
                    return Err(DbError::Migration(format!(
                        "migration {} ({}) was edited after it was applied (checksum {recorded_sum} in the database, {sum} in this binary); add a new migration instead",
                        migration.id(),
                        migration.name
                    )));
                }
                report.already_applied.push(migration.id());
            }
            None => {
                tx.batch_execute(migration.sql).await.map_err(|err| {
                    DbError::Migration(format!(
                        "migration {} ({}) failed: {}",
                        migration.id(),
                        migration.name,
                        super::error_chain(&err)
                    ))
                })?;
                tx.execute(
                    "INSERT INTO cascade_schema_migrations (module, version, name, checksum) VALUES ($1, $2, $3, $4)",
                    &[&migration.module, &migration.version, &migration.name, &sum],
                )
                .await?;
                tracing::info!(
                    module = migration.module,
                    version = migration.version,
                    name = migration.name,
                    "migration applied"
                );
                report.applied.push(migration.id());
            }
        }
        tx.commit().await?;
    }
    Ok(report)
}

/// A transaction holding the migration lock. The timeout goes first so that waiting for
/// another instance's migration is not cut short either.
async fn locked(client: &mut Client) -> Result<Transaction<'_>, DbError> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    Ok(tx)
}

/// Whether the bookkeeping table exists, and whether it already has per-module keys. Read under
/// the lock: another instance may be creating or upgrading it right now.
const BOOKKEEPING_STATE: &str = "
    SELECT to_regclass('cascade_schema_migrations') IS NOT NULL,
           EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = to_regclass('cascade_schema_migrations')
                     AND attname = 'module' AND NOT attisdropped)";

const CREATE_BOOKKEEPING: &str = "
    CREATE TABLE cascade_schema_migrations (
        module     TEXT NOT NULL,
        version    BIGINT NOT NULL,
        name       TEXT NOT NULL,
        checksum   TEXT NOT NULL,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (module, version)
    )";

/// First step of the legacy upgrade. The old key goes first: re-keyed rows reuse small
/// numbers (`alpha/1`) that old rows still hold until the `UPDATE` reaches them.
const LEGACY_UNKEY: &str = "
    ALTER TABLE cascade_schema_migrations
        DROP CONSTRAINT cascade_schema_migrations_pkey,
        ADD COLUMN module TEXT";

/// Moves every old row to its owner's `(module, version)` in one statement; the arrays are
/// parallel (old number, module, version). Name, checksum and `applied_at` stay as recorded.
const LEGACY_REKEY: &str = "
    UPDATE cascade_schema_migrations AS recorded
    SET module = claim.module, version = claim.version
    FROM unnest($1::BIGINT[], $2::TEXT[], $3::BIGINT[]) AS claim (legacy_version, module, version)
    WHERE recorded.version = claim.legacy_version";

const LEGACY_REKEYED: &str = "
    ALTER TABLE cascade_schema_migrations
        ALTER COLUMN module SET NOT NULL,
        ADD PRIMARY KEY (module, version)";

/// Creates the bookkeeping table, or upgrades one from before module version spaces; returns
/// how many old rows were re-keyed. One transaction under the lock: a failed upgrade leaves
/// the old table exactly as it was, and a concurrent instance finds either the old format or
/// the finished new one, never a half-done table.
async fn prepare_bookkeeping(client: &mut Client, plan: &Plan<'_>) -> Result<u64, DbError> {
    let tx = locked(client).await?;
    let state = tx.query_one(BOOKKEEPING_STATE, &[]).await?;
    let (exists, per_module): (bool, bool) = (state.get(0), state.get(1));
    let rekeyed = match (exists, per_module) {
        (false, _) => {
            tx.batch_execute(CREATE_BOOKKEEPING).await?;
            0
        }
        (true, true) => 0,
        (true, false) => rekey_legacy_rows(&tx, plan).await?,
    };
    tx.commit().await?;
    Ok(rekeyed)
}

async fn rekey_legacy_rows(tx: &Transaction<'_>, plan: &Plan<'_>) -> Result<u64, DbError> {
    let rows = tx
        .query(
            "SELECT version, name, checksum FROM cascade_schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut problems = Vec::new();
    let (mut olds, mut modules, mut versions) = (Vec::new(), Vec::new(), Vec::new());
    for row in &rows {
        let (old, name, recorded_sum): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
        match plan.claiming(old) {
            None => problems.push(format!(
                "recorded migration {old} ({name}) is claimed by no registered migration (none declares legacy_version {old}; is its module missing from this build?)"
            )),
            Some(migration) if checksum(migration.sql) != recorded_sum => {
                problems.push(format!(
                    "recorded migration {old} ({name}) is claimed by {} ({}), whose SQL differs from what was applied (checksum {recorded_sum} in the database, {} in this binary)",
                    migration.id(),
                    migration.name,
                    checksum(migration.sql)
                ))
            }
            Some(migration) => {
                olds.push(old);
                modules.push(migration.module);
                versions.push(migration.version);
            }
        }
    }
    if !problems.is_empty() {
        return Err(DbError::Migration(format!(
            "cannot upgrade cascade_schema_migrations to per-module versions; nothing was changed: {}",
            problems.join("; ")
        )));
    }

    tx.batch_execute(LEGACY_UNKEY).await?;
    let rekeyed = tx
        .execute(LEGACY_REKEY, &[&olds, &modules, &versions])
        .await?;
    tx.batch_execute(LEGACY_REKEYED).await?;
    tracing::info!(
        rows = rekeyed,
        "migration bookkeeping upgraded to per-module versions"
    );
    Ok(rekeyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALPHA: &[Migration] = &[
        Migration::new("alpha", 1, "a", "SELECT 1"),
        Migration::new("alpha", 2, "b", "SELECT 2"),
    ];

    fn refusal(modules: &[&[Migration]]) -> String {
        match check_migrations(modules) {
            Ok(()) => panic!("{modules:?} must be refused"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn the_core_counts_from_one_and_keeps_its_global_numbers() {
        for (index, migration) in CORE_MIGRATIONS.iter().enumerate() {
            let expected = index as i64 + 1;
            assert_eq!(migration.module, CORE_MODULE);
            assert_eq!(migration.version, expected, "{migration:?}");
            // The three from before version spaces keep their global numbers; later ones
            // never had one (4 and 5 were the catalog's).
            let legacy = (expected <= 3).then_some(expected);
            assert_eq!(migration.legacy_version, legacy, "{migration:?}");
        }
        check_migrations(&[CORE_MIGRATIONS]).expect("the core's list alone is consistent");
    }

    #[test]
    fn versions_must_strictly_increase_within_a_module() {
        let repeated = [ALPHA[0], Migration::new("alpha", 1, "again", "SELECT 3")];
        assert!(refusal(&[&repeated]).contains("strictly increase"));
        let backwards = [ALPHA[1], ALPHA[0]];
        assert!(refusal(&[&backwards]).contains("strictly increase"));
    }

    #[test]
    fn modules_may_reuse_each_others_version_numbers() {
        let beta = [
            Migration::new("beta", 1, "a", "SELECT 1"),
            Migration::new("beta", 2, "b", "SELECT 2"),
        ];
        check_migrations(&[CORE_MIGRATIONS, ALPHA, &beta]).unwrap();
    }

    #[test]
    fn a_module_name_belongs_to_one_list() {
        let more_alpha = [Migration::new("alpha", 3, "c", "SELECT 3")];
        assert!(refusal(&[ALPHA, &more_alpha]).contains("module \"alpha\" is registered by more"));
        assert!(refusal(&[CORE_MIGRATIONS, CORE_MIGRATIONS]).contains("module \"core\""));
        let mixed = [ALPHA[0], Migration::new("beta", 2, "b", "SELECT 2")];
        assert!(refusal(&[&mixed]).contains("one module"));
    }

    #[test]
    fn the_core_comes_before_the_modules_that_build_on_it() {
        check_migrations(&[ALPHA]).expect("a module alone is fine (tests do it)");
        assert!(refusal(&[ALPHA, CORE_MIGRATIONS]).contains("must come first"));
    }

    #[test]
    fn an_old_global_number_has_one_owner() {
        let claims_identity = [Migration::new("alpha", 1, "a", "SELECT 1").legacy(3)];
        let message = refusal(&[CORE_MIGRATIONS, &claims_identity]);
        assert!(
            message.contains("core/3") && message.contains("alpha/1"),
            "{message}"
        );
    }

    #[test]
    fn checksum_notices_an_edit() {
        assert_ne!(checksum("CREATE TABLE a ()"), checksum("CREATE TABLE b ()"));
        assert_eq!(checksum("x"), checksum("x"));
    }

    /// Databases hold checksums computed by every past release: the function is FNV-1a 64 for good.
    #[test]
    fn checksum_is_fnv1a_64() {
        assert_eq!(checksum(""), "cbf29ce484222325");
        assert_eq!(checksum("a"), "af63dc4c8601ec8c");
    }

    #[test]
    fn a_report_logs_as_module_slash_version() {
        let report = MigrationReport {
            applied: vec![ALPHA[0].id()],
            already_applied: vec![CORE_MIGRATIONS[0].id()],
            legacy_rows_rekeyed: 0,
        };
        assert_eq!(format!("{:?}", report.applied), "[alpha/1]");
        assert_eq!(report.to_string(), "applied [alpha/1], 1 already applied");
    }
}
