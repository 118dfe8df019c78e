use std::time::Duration;

use crate::common::{cascade, empty_dir, run_bounded};

#[test]
fn closed_port_exits_within_the_bound_naming_the_address() {
    let dir = empty_dir();
    let mut command = cascade(&dir);
    // Port 1 (tcpmux) is below the ephemeral range and nothing listens there.
    command
        .arg("serve")
        .env(
            "DATABASE_URL",
            "postgresql://cascade:secret-pw@127.0.0.1:1/cascade",
        )
        .env("PG_STARTUP_TIMEOUT", "3s")
        .env("PORT", "0");
    let (out, elapsed) = run_bounded(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert!(!stderr.contains("secret-pw"), "{stderr}");
}

#[test]
fn unresolvable_host_exits_within_the_bound_naming_it() {
    let dir = empty_dir();
    let mut command = cascade(&dir);
    command
        .arg("migrate")
        .env(
            "DATABASE_URL",
            "postgresql://cascade@db.does-not-exist.invalid:5432/cascade",
        )
        .env("PG_STARTUP_TIMEOUT", "3s");
    let (out, elapsed) = run_bounded(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(
        stderr.contains("db.does-not-exist.invalid:5432"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_passes_with_reachable_dependencies_and_fails_without() {
    let pg = cascade_testkit::PgServer::start().await;
    let redis = cascade_testkit::RedisServer::start().await;
    let url = pg.fresh_database().await;
    let dir = empty_dir();

    let mut command = cascade(&dir);
    command
        .arg("check")
        .env("DATABASE_URL", &url)
        .env("REDIS_URL", redis.url())
        .env("VENICE_API_URL", "http://127.0.0.1:1");
    let (out, _) = run_bounded(command, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[ok  ] postgresql"), "{stdout}");
    assert!(stdout.contains("[ok  ] redis"), "{stdout}");
    assert!(stdout.contains("[warn] venice"), "{stdout}");

    drop(redis);
    let mut command = cascade(&dir);
    command
        .arg("check")
        .env("DATABASE_URL", &url)
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env("VENICE_API_URL", "http://127.0.0.1:1");
    let (out, _) = run_bounded(command, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("[FAIL] redis"), "{stdout}");
}
