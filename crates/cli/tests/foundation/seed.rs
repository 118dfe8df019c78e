//! `cascade seed catalog`.

use std::time::Duration;

use cascade_testkit::PgServer;

use crate::common::{cascade, empty_dir, run_bounded};

const SEED_ARGS: &[&str] = &["--assets", "3000", "--producers", "5"];

async fn seed(url: &str, args: &[&str]) -> String {
    let mut command = cascade(&empty_dir());
    command
        .args(["seed", "catalog"])
        .args(args)
        .env("DATABASE_URL", url);
    let (out, _) = run_bounded(command, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn seed_catalog_is_reproducible_rerunnable_and_a_dag() {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_string();
    let client_of = || pg.client(&database);

    let out = seed(&url, &[SEED_ARGS, &["--seed", "5"]].concat()).await;
    assert!(out.contains("seeded 3000 assets"), "{out}");
    let client = client_of().await;
    let fingerprint = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM assets), \
                        (SELECT md5(string_agg(parent_version_id || '>' || child_version_id, ',' \
                            ORDER BY parent_version_id, child_version_id)) FROM lineage_edges), \
                        (SELECT count(*) FROM lineage_edges \
                          WHERE right(parent_version_id, 7)::int >= right(child_version_id, 7)::int), \
                        (SELECT count(*) FROM receipts), (SELECT count(*) FROM producers)",
                &[],
            )
            .await
            .unwrap();
        let (assets, edges, backwards, receipts, producers): (i64, String, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(backwards, 0, "every parent is an earlier asset: a DAG");
        (assets, edges, receipts, producers)
    };
    // The seed vacuums and analyses what it loaded, as `pgbench -i` does: autovacuum's first
    // pass over the fresh tables does not land in whatever runs next.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let vacuumed: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_user_tables \
                  WHERE relname IN ('producers', 'assets', 'lineage_edges', 'receipts', 'policies') \
                    AND last_vacuum IS NOT NULL AND last_analyze IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if vacuumed == 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vacuumed} of the 5 seeded tables vacuumed and analysed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = fingerprint(client).await;
    assert_eq!(first.0, 3000);
    assert_eq!(first.3, 5);
    assert!(
        first.2 > 2000 && first.2 < 3000,
        "most, not all, have receipts"
    );

    let out = seed(&url, &[SEED_ARGS, &["--seed", "5"]].concat()).await;
    assert!(
        out.contains("seeded 0 assets"),
        "a rerun skips what exists: {out}"
    );
    assert_eq!(fingerprint(client_of().await).await, first);

    seed(&url, &[SEED_ARGS, &["--seed", "5", "--reset"]].concat()).await;
    assert_eq!(
        fingerprint(client_of().await).await,
        first,
        "same seed, same catalog"
    );
    seed(&url, &[SEED_ARGS, &["--seed", "6", "--reset"]].concat()).await;
    assert_ne!(
        fingerprint(client_of().await).await.1,
        first.1,
        "another seed, other lineage"
    );
}

#[tokio::test]
async fn seed_owner_gets_the_generated_producers_and_nobody_elses() {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_string();
    let run = |args: Vec<&'static str>| {
        let mut command = cascade(&empty_dir());
        command
            .args(["seed", "catalog", "--assets", "200", "--producers", "2"])
            .args(args)
            .env("DATABASE_URL", &url);
        run_bounded(command, Duration::from_secs(120)).0
    };

    let out = run(vec!["--owner", "alice"]);
    assert_eq!(out.status.code(), Some(2), "no such account yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account named \"alice\""));

    // Accounts as registration leaves them (the seed only reads their ids).
    let client = pg.client(&database).await;
    client
        .batch_execute(
            "INSERT INTO cascade_users (username, password_hash) VALUES ('alice', 'x'), ('bob', 'x')",
        )
        .await
        .unwrap();
    let out = run(vec!["--owner", "ALICE"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owners: Vec<Option<String>> = client
        .query(
            "SELECT u.username FROM producers p LEFT JOIN cascade_users u ON u.id = p.owner_id \
             ORDER BY p.producer_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        owners,
        [Some("alice".to_string()), Some("alice".to_string())]
    );

    // Producers that belong to someone else stop the seed, and nothing is written.
    let out = run(vec!["--owner", "bob"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("belongs to another account"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(vec![]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "unowned seeding into owned producers"
    );
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM producers WHERE owner_id IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}
