use std::time::Duration;

use cascade_testkit::PgServer;

use crate::common::{cascade, empty_dir, run_bounded};

#[tokio::test]
async fn two_concurrent_migrations_both_succeed_and_apply_once() {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let dir = empty_dir();
    let spawn = || {
        let mut command = cascade(&dir);
        command.arg("migrate").env("DATABASE_URL", &url);
        std::thread::spawn(move || run_bounded(command, Duration::from_secs(60)).0)
    };
    let (a, b) = (spawn(), spawn());
    for out in [a.join().unwrap(), b.join().unwrap()] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let db = url.rsplit('/').next().unwrap();
    let client = pg.client(db).await;
    let rows = client
        .query("SELECT module, version, count(*) FROM cascade_schema_migrations GROUP BY module, version ORDER BY module, version", &[])
        .await
        .unwrap();
    let expected = cascade_core::db::CORE_MIGRATIONS.len()
        + cascade_catalog::MIGRATIONS.len()
        + cascade_app::MIGRATIONS.len()
        + cascade_agents::MIGRATIONS.len();
    assert_eq!(rows.len(), expected);
    assert!(rows.iter().all(|r| r.get::<_, i64>(2) == 1));
    client
        .query_one("SELECT count(*) FROM cache_entries", &[])
        .await
        .expect("schema exists");

    // Re-running is a no-op.
    let mut command = cascade(&dir);
    command.arg("migrate").env("DATABASE_URL", &url);
    let (out, _) = run_bounded(command, Duration::from_secs(60));
    assert!(out.status.success());
    let count: i64 = client
        .query_one("SELECT count(*) FROM cascade_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as usize, expected);
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let config: tokio_postgres::Config = url.parse().unwrap();
    let original = [cascade_core::db::Migration::new(
        "t",
        1,
        "t",
        "CREATE TABLE t (a int)",
    )];
    let edited = [cascade_core::db::Migration::new(
        "t",
        1,
        "t",
        "CREATE TABLE t (a bigint)",
    )];
    let report = cascade_core::db::migrate(&config, &[&original])
        .await
        .unwrap();
    assert_eq!(report.applied.len(), 1);
    let err = cascade_core::db::migrate(&config, &[&edited])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("edited after it was applied"),
        "{err}"
    );
}
