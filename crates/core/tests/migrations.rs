//! Migrations against a real PostgreSQL: per-module version spaces, the "re-running is a no-op"
//! and "an edited migration is refused" rules, two instances at once, and the in-place upgrade
//! of a database made before module version spaces (one global list keyed by `version`).
//!
//! The modules here are synthetic: "alpha" and "beta" each own two tiny migrations.

use std::collections::HashMap;
use std::time::Duration;

use cascade_core::db::{CORE_MIGRATIONS, DbError, Migration, MigrationId, migrate};
use cascade_testkit::PgServer;

/// The core's list as the releases before version spaces had it (1 to 3, each with its global
/// number): what these tests of the machinery build on. The core's later migrations (which
/// never had a global number) are applied by every application test and the server's
/// upgrade test.
fn core() -> &'static [Migration] {
    &CORE_MIGRATIONS[..3]
}

const ALPHA: &[Migration] = &[
    Migration::new(
        "alpha",
        1,
        "widgets",
        "CREATE TABLE alpha_widgets (id BIGINT PRIMARY KEY, label TEXT NOT NULL)",
    ),
    Migration::new(
        "alpha",
        2,
        "widget_colour",
        "ALTER TABLE alpha_widgets ADD COLUMN colour TEXT",
    ),
];

/// The same version numbers as alpha's, in another version space.
const BETA: &[Migration] = &[
    Migration::new(
        "beta",
        1,
        "things",
        "CREATE TABLE beta_things (id BIGINT PRIMARY KEY)",
    ),
    Migration::new(
        "beta",
        2,
        "thing_weight",
        "ALTER TABLE beta_things ADD COLUMN weight INT",
    ),
];

/// Alpha one release later.
const ALPHA_NEXT: &[Migration] = &[
    ALPHA[0],
    ALPHA[1],
    Migration::new(
        "alpha",
        3,
        "gadgets",
        "CREATE TABLE alpha_gadgets (id BIGINT PRIMARY KEY)",
    ),
];

/// Alpha as it would be declared after shipping as numbers 4 and 5 of the old global list,
/// right after the core's 1 to 3 — as the module split out of today's core is.
const LEGACY_ALPHA: &[Migration] = &[ALPHA[0].legacy(4), ALPHA[1].legacy(5)];

/// A new migration added to that module after the split.
const LEGACY_ALPHA_NEXT: &[Migration] = &[LEGACY_ALPHA[0], LEGACY_ALPHA[1], ALPHA_NEXT[2]];

/// What the core, then alpha, record on a fresh database.
const CORE_AND_ALPHA: [&str; 5] = ["core/1", "core/2", "core/3", "alpha/1", "alpha/2"];

/// A fresh database, its connection settings, and a superuser client to inspect it.
async fn database(pg: &PgServer) -> (tokio_postgres::Config, tokio_postgres::Client) {
    let url = pg.fresh_database().await;
    let name = url.rsplit('/').next().expect("database name");
    (url.parse().expect("url"), pg.client(name).await)
}

fn ids(ids: &[MigrationId]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

async fn recorded(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT module || '/' || version FROM cascade_schema_migrations ORDER BY module <> 'core', module, version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn table_exists(client: &tokio_postgres::Client, table: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

/// The primary key columns of the bookkeeping table, in order.
async fn bookkeeping_key(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query_one(
            "SELECT array_agg(a.attname::text ORDER BY k.ord)
             FROM pg_constraint c
             CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k (attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
             WHERE c.conrelid = 'cascade_schema_migrations'::regclass AND c.contype = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn message(result: Result<impl std::fmt::Debug, DbError>) -> String {
    match result {
        Ok(report) => panic!("expected a refusal, got {report:?}"),
        Err(err) => err.to_string(),
    }
}

#[tokio::test]
async fn a_fresh_database_gets_every_migration_and_a_rerun_is_a_no_op() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;

    let first = migrate(&config, &[core(), ALPHA]).await.unwrap();
    assert_eq!(ids(&first.applied), CORE_AND_ALPHA);
    assert!(first.already_applied.is_empty());
    assert_eq!(first.legacy_rows_rekeyed, 0);
    assert_eq!(bookkeeping_key(&client).await, ["module", "version"]);
    client
        .execute(
            "INSERT INTO alpha_widgets (id, label, colour) VALUES (1, 'w', 'red')",
            &[],
        )
        .await
        .expect("alpha's schema exists");

    let again = migrate(&config, &[core(), ALPHA]).await.unwrap();
    assert!(again.applied.is_empty(), "{again}");
    assert_eq!(ids(&again.already_applied), CORE_AND_ALPHA);
    assert_eq!(recorded(&client).await, CORE_AND_ALPHA);
}

#[tokio::test]
async fn two_modules_with_overlapping_versions_coexist() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;

    let report = migrate(&config, &[core(), ALPHA, BETA]).await.unwrap();
    let both = [
        "core/1", "core/2", "core/3", "alpha/1", "alpha/2", "beta/1", "beta/2",
    ];
    assert_eq!(ids(&report.applied), both);
    assert!(table_exists(&client, "alpha_widgets").await);
    assert!(table_exists(&client, "beta_things").await);

    // A module's next migration is applied alone, whatever the other modules' numbers.
    let next = migrate(&config, &[core(), ALPHA_NEXT, BETA]).await.unwrap();
    assert_eq!(ids(&next.applied), ["alpha/3"]);
    assert_eq!(next.already_applied.len(), both.len());
    assert!(table_exists(&client, "alpha_gadgets").await);
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;
    migrate(&config, &[core(), ALPHA]).await.unwrap();

    let edited = [
        ALPHA[0],
        Migration::new(
            "alpha",
            2,
            "widget_colour",
            "ALTER TABLE alpha_widgets ADD COLUMN color TEXT",
        ),
    ];
    let err = message(migrate(&config, &[core(), &edited]).await);
    assert!(
        err.contains("alpha/2 (widget_colour) was edited after it was applied"),
        "{err}"
    );
    let has_color: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                            WHERE table_name = 'alpha_widgets' AND column_name = 'color')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!has_color, "the edited SQL must not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_serialise_and_apply_each_migration_once() {
    // Slow enough that the second run is waiting on the lock while the first applies it.
    const SLOW: &[Migration] = &[Migration::new(
        "slow",
        1,
        "sleepy",
        "SELECT pg_sleep(0.5); CREATE TABLE slow_t (id INT)",
    )];
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;

    let run = || {
        let config = config.clone();
        tokio::spawn(async move { migrate(&config, &[core(), ALPHA, SLOW]).await })
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());

    let mut times_applied: HashMap<String, usize> = HashMap::new();
    for id in ids(&a.applied).into_iter().chain(ids(&b.applied)) {
        *times_applied.entry(id).or_default() += 1;
    }
    assert_eq!(times_applied.len(), CORE_AND_ALPHA.len() + 1, "{a} / {b}");
    assert!(times_applied.values().all(|&n| n == 1), "{a} / {b}");
    assert_eq!(a.applied.len() + a.already_applied.len(), 6);
    assert_eq!(b.applied.len() + b.already_applied.len(), 6);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM cascade_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 6);
}

/// The checksum as every release computed it (FNV-1a 64 of the SQL). Written out again here on
/// purpose: if the library's ever changed, old databases would stop matching, and the upgrade
/// tests below would say so.
fn old_checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Builds what today's main leaves behind: its bookkeeping table (keyed by `version` alone,
/// created by the same statement) and each migration of the global list applied and recorded
/// under its global number. `recorded_sql` is what each row's checksum was computed from,
/// normally the SQL itself.
async fn old_format_database(
    client: &tokio_postgres::Client,
    global_list: &[(i64, &str, &str, &str)],
) {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS cascade_schema_migrations (
                 version    BIGINT PRIMARY KEY,
                 name       TEXT NOT NULL,
                 checksum   TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .unwrap();
    for &(version, name, sql, recorded_sql) in global_list {
        client.batch_execute(sql).await.unwrap();
        client
            .execute(
                "INSERT INTO cascade_schema_migrations (version, name, checksum, applied_at)
                 VALUES ($1, $2, $3, now() - make_interval(days => 30 - $4))",
                &[
                    &version,
                    &name,
                    &old_checksum(recorded_sql),
                    &(version as i32),
                ],
            )
            .await
            .unwrap();
    }
}

/// Today's main's list with alpha where its split-out module was: core 1-3, alpha 4-5.
fn todays_global_list() -> Vec<(i64, &'static str, &'static str, &'static str)> {
    core()
        .iter()
        .chain(LEGACY_ALPHA)
        .map(|m| (m.legacy_version.unwrap(), m.name, m.sql, m.sql))
        .collect()
}

/// Every column of every recorded row, in a comparable form.
async fn bookkeeping_rows(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT row_to_json(m)::text FROM cascade_schema_migrations m ORDER BY checksum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// `(name, checksum, applied_at)` of every row, which the upgrade must carry over unchanged.
async fn history(client: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT name, checksum, applied_at::text FROM cascade_schema_migrations ORDER BY applied_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

async fn insert_application_data(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "INSERT INTO cascade_users (username, password_hash) VALUES ('alice', 'x');
             INSERT INTO alpha_widgets (id, label, colour) VALUES (7, 'kept', 'blue');",
        )
        .await
        .unwrap();
}

async fn assert_application_data_kept(client: &tokio_postgres::Client) {
    let user: String = client
        .query_one("SELECT username FROM cascade_users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "alice");
    let widget = client
        .query_one("SELECT label, colour FROM alpha_widgets WHERE id = 7", &[])
        .await
        .unwrap();
    assert_eq!(widget.get::<_, String>(0), "kept");
    assert_eq!(widget.get::<_, String>(1), "blue");
}

#[tokio::test]
async fn a_database_from_the_global_list_era_upgrades_in_place() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;
    old_format_database(&client, &todays_global_list()).await;
    insert_application_data(&client).await;
    let before = history(&client).await;

    let report = migrate(&config, &[core(), LEGACY_ALPHA]).await.unwrap();
    assert!(report.applied.is_empty(), "nothing is re-applied: {report}");
    assert_eq!(ids(&report.already_applied), CORE_AND_ALPHA);
    assert_eq!(report.legacy_rows_rekeyed, 5);

    assert_application_data_kept(&client).await;
    assert_eq!(recorded(&client).await, CORE_AND_ALPHA);
    assert_eq!(
        history(&client).await,
        before,
        "names, checksums and times kept"
    );
    assert_eq!(bookkeeping_key(&client).await, ["module", "version"]);

    // From now on it is an ordinary per-module database.
    let next = migrate(&config, &[core(), LEGACY_ALPHA_NEXT])
        .await
        .unwrap();
    assert_eq!(ids(&next.applied), ["alpha/3"]);
    assert_eq!(next.legacy_rows_rekeyed, 0);
    assert_application_data_kept(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_upgrading_an_old_database_at_once_rekey_it_once() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;
    old_format_database(&client, &todays_global_list()).await;
    insert_application_data(&client).await;

    let run = || {
        let config = config.clone();
        tokio::spawn(async move { migrate(&config, &[core(), LEGACY_ALPHA_NEXT]).await })
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());

    let mut rekeyed = [a.legacy_rows_rekeyed, b.legacy_rows_rekeyed];
    rekeyed.sort();
    assert_eq!(rekeyed, [0, 5], "{a} / {b}");
    let mut applied = ids(&a.applied);
    applied.extend(ids(&b.applied));
    assert_eq!(applied, ["alpha/3"]);
    assert_application_data_kept(&client).await;
    let mut all = CORE_AND_ALPHA.to_vec();
    all.push("alpha/3");
    assert_eq!(recorded(&client).await, all);
}

#[tokio::test]
async fn an_old_row_no_migration_claims_fails_the_upgrade_and_changes_nothing() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;
    let mut global_list = todays_global_list();
    // Number 6 belonged to a module this build does not register.
    let orphan = "CREATE TABLE gamma_items (id INT)";
    global_list.push((6, "gamma_items", orphan, orphan));
    old_format_database(&client, &global_list).await;
    insert_application_data(&client).await;
    let before = bookkeeping_rows(&client).await;

    let err = message(migrate(&config, &[core(), LEGACY_ALPHA_NEXT]).await);
    assert!(
        err.contains("recorded migration 6 (gamma_items) is claimed by no registered migration"),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");

    assert_eq!(bookkeeping_rows(&client).await, before);
    assert_eq!(bookkeeping_key(&client).await, ["version"]);
    assert!(
        !table_exists(&client, "alpha_gadgets").await,
        "no migration runs on a database whose history is not understood"
    );
    assert_application_data_kept(&client).await;
}

#[tokio::test]
async fn an_old_row_whose_sql_was_edited_since_fails_the_upgrade_naming_it() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;
    let mut global_list = todays_global_list();
    // What the database applied as number 5 is not what alpha/2 says today.
    global_list[4].3 = "ALTER TABLE alpha_widgets ADD COLUMN colour VARCHAR(20)";
    old_format_database(&client, &global_list).await;
    let before = bookkeeping_rows(&client).await;

    let err = message(migrate(&config, &[core(), LEGACY_ALPHA]).await);
    assert!(
        err.contains("recorded migration 5 (widget_colour) is claimed by alpha/2 (widget_colour), whose SQL differs"),
        "{err}"
    );
    assert_eq!(bookkeeping_rows(&client).await, before);
    assert_eq!(bookkeeping_key(&client).await, ["version"]);
}

#[tokio::test]
async fn a_module_name_used_by_two_lists_is_refused_before_touching_the_database() {
    let pg = PgServer::start().await;
    let (config, client) = database(&pg).await;
    let more_alpha = [Migration::new(
        "alpha",
        3,
        "gadgets",
        "CREATE TABLE alpha_gadgets (id INT)",
    )];

    let err = message(migrate(&config, &[core(), ALPHA, &more_alpha]).await);
    assert!(
        err.contains("module \"alpha\" is registered by more than one list"),
        "{err}"
    );
    // Modules build on the core's tables: its list cannot come after theirs.
    let err = message(migrate(&config, &[ALPHA, core()]).await);
    assert!(err.contains("must come first"), "{err}");

    assert!(!table_exists(&client, "cascade_schema_migrations").await);
    assert!(!table_exists(&client, "cache_entries").await);
}

/// A migration that waits for another instance is not cut short by a timeout of the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_another_instance_outlasts_a_session_statement_timeout() {
    const SLOW: &[Migration] = &[Migration::new(
        "slow",
        1,
        "sleepy",
        "SELECT pg_sleep(1); CREATE TABLE slow_t (id INT)",
    )];
    let pg = PgServer::start().await;
    let (config, _client) = database(&pg).await;
    let mut impatient = config.clone();
    impatient.options("-c statement_timeout=200");

    let first = tokio::spawn(async move { migrate(&config, &[core(), SLOW]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn(async move { migrate(&impatient, &[core(), SLOW, ALPHA]).await });
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert!(
        ids(&first.applied).contains(&"slow/1".to_string()),
        "{first}"
    );
    assert_eq!(ids(&second.applied), ["alpha/1", "alpha/2"], "{second}");
}
