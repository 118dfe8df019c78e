//! `cascade check` and read replicas (DATABASE_REPLICA_URLS), against a real primary and a
//! real streaming replica (`pg_basebackup -R`, the test kit's).

use cascade_testkit::PgServer;

use crate::common::{check_line as line, check_output};

#[tokio::test]
async fn check_passes_with_a_caught_up_replica_and_warns_when_its_replay_stops() {
    let primary = PgServer::start_primary().await;
    let replica = primary.start_replica().await;
    let env = [
        ("DATABASE_URL", primary.url("postgres")),
        ("DATABASE_REPLICA_URLS", replica.url("postgres")),
        ("DATABASE_REPLICA_MAX_LAG", "300ms".to_string()),
    ];

    let (code, output) = check_output(&env, &[]);
    assert_eq!(code, Some(0), "{output}");
    let ok = line(&output, "pg replica");
    assert!(ok.starts_with("  [ok  ]"), "{output}");
    assert!(
        ok.contains(&format!("127.0.0.1:{}", replica.port())),
        "{ok}"
    );
    assert!(
        ok.contains("in recovery, a replica of the primary's cluster, replayed the primary's current WAL position in"),
        "{ok}"
    );
    assert!(
        line(&output, "synchronous_commit").starts_with("  [ok  ] synchronous_commit"),
        "{output}"
    );

    // Replay stopped, then a write: the replica answers, but falls behind for good.
    replica
        .client("postgres")
        .await
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    primary
        .client("postgres")
        .await
        .batch_execute("CREATE TABLE written_after_the_pause (x int); INSERT INTO written_after_the_pause VALUES (1)")
        .await
        .unwrap();
    let (code, output) = check_output(&env, &[]);
    assert_eq!(code, Some(0), "a lagging replica is a warning:\n{output}");
    let lagging = line(&output, "pg replica");
    assert!(lagging.starts_with("  [warn]"), "{output}");
    assert!(
        lagging.contains("bytes of the primary's WAL not replayed after")
            && lagging.contains("further behind than DATABASE_REPLICA_MAX_LAG 300ms"),
        "{lagging}"
    );
}

#[tokio::test]
async fn check_fails_for_a_replica_url_that_names_no_replica() {
    let primary = PgServer::start().await;
    let standalone = PgServer::start().await;
    let env = [
        ("DATABASE_URL", primary.url("postgres")),
        (
            "DATABASE_REPLICA_URLS",
            // Port 1 (tcpmux) is below the ephemeral range and nothing listens there.
            format!(
                "{},postgresql://postgres@127.0.0.1:1/postgres",
                standalone.url("postgres")
            ),
        ),
    ];

    let (code, output) = check_output(&env, &[]);
    assert_eq!(code, Some(1), "{output}");
    let standalone_line = line(&output, "pg replica 1");
    assert!(standalone_line.starts_with("  [FAIL]"), "{output}");
    assert!(
        standalone_line.contains(&format!("127.0.0.1:{}", standalone.port()))
            && standalone_line.contains("is not in recovery: a primary or a standalone server"),
        "{standalone_line}"
    );
    let unreachable = line(&output, "pg replica 2");
    assert!(
        unreachable.starts_with("  [FAIL]") && unreachable.contains("127.0.0.1:1"),
        "{output}"
    );
    assert!(
        output.contains("a required dependency does not answer"),
        "{output}"
    );
}
