use std::time::Duration;

use crate::common::{cascade, check_line, check_output, config_set, empty_dir, run_bounded};

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

/// The line of `name` in the production review, e.g. `[warn] maxmemory …`.
fn finding<'a>(stdout: &'a str, name: &str) -> &'a str {
    let review = stdout
        .split("production review")
        .nth(1)
        .unwrap_or_else(|| panic!("no production review in:\n{stdout}"));
    check_line(review, name)
}

#[tokio::test]
async fn check_reviews_postgres_and_redis_settings_for_production() {
    let pg = cascade_testkit::PgServer::start().await;
    let redis = cascade_testkit::RedisServer::start().await;
    let url = pg.fresh_database().await;
    let env = [
        ("DATABASE_URL", url.clone()),
        ("REDIS_URL", redis.url()),
        ("PG_POOL_MAX", "10".to_string()),
    ];

    // The test kit's servers run with laptop settings: no Redis memory limit, `noeviction`,
    // 16 MB of shared buffers, PostgreSQL's default planner costs and work_mem; 20 instances
    // of 13 connections do not fit in max_connections 200.
    let (code, stdout) = check_output(&env, &["--instances", "20"]);
    assert_eq!(code, Some(0), "warnings do not fail the check:\n{stdout}");
    for (name, says) in [
        ("maxmemory", "no limit"),
        ("eviction", "noeviction"),
        ("shared_buffers", "16 MB, below seed 002's 256 MB"),
        ("work_mem", "4 MB, below seed 002's 16 MB"),
        ("random_page_cost", "set 1.1"),
        (
            "connections",
            "20 instance(s) × (PG_POOL_MAX 10 + 3 listeners) = 260",
        ),
    ] {
        let line = finding(&stdout, name);
        assert!(
            line.contains("[warn]") && line.contains(says),
            "{line}\n{stdout}"
        );
    }
    assert!(finding(&stdout, "pg tls").contains("[ok  ]"), "{stdout}");
    assert!(finding(&stdout, "redis tls").contains("[ok  ]"), "{stdout}");
    assert!(
        finding(&stdout, "redis info").contains("[ok  ]"),
        "{stdout}"
    );

    // Set as advised, the same findings pass.
    config_set(
        &redis.url(),
        &[("maxmemory", "64mb"), ("maxmemory-policy", "allkeys-lru")],
    )
    .await;
    let admin = pg.client("postgres").await;
    // One statement per call: several in one string are one transaction, which ALTER SYSTEM
    // refuses.
    for statement in [
        "ALTER SYSTEM SET work_mem = '16MB'",
        "ALTER SYSTEM SET random_page_cost = 1.1",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(statement).await.expect(statement);
    }
    // The reload is a signal: wait until a new session sees it.
    for attempt in 0.. {
        let fresh = pg.client("postgres").await;
        let row = fresh.query_one("SHOW work_mem", &[]).await.expect("SHOW");
        if row.get::<_, String>(0) == "16MB" {
            break;
        }
        assert!(attempt < 100, "the reload did not apply in 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, stdout) = check_output(&env, &["--instances", "2"]);
    assert_eq!(code, Some(0), "{stdout}");
    for (name, says) in [
        ("maxmemory", "64 MB"),
        ("eviction", "allkeys-lru"),
        ("work_mem", "16 MB"),
        ("random_page_cost", "1.1"),
        ("connections", "= 26"),
    ] {
        let line = finding(&stdout, name);
        assert!(
            line.contains("[ok  ]") && line.contains(says),
            "{line}\n{stdout}"
        );
    }

    // A user whose ACL keeps INFO from it, as from the scripts it runs: speculative stores
    // cannot tell an eviction, so they store nothing; the review says so and how to mend it.
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "noinfo", "on", ">pw", "~*", "&*", "+@all", "-info",
        ])
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let limited = redis.url().replace("redis://", "redis://noinfo:pw@");
    let env = [env[0].clone(), ("REDIS_URL", limited), env[2].clone()];
    let (code, stdout) = check_output(&env, &["--instances", "2"]);
    assert_eq!(code, Some(0), "{stdout}");
    let line = finding(&stdout, "redis info");
    assert!(
        line.contains("[warn]") && line.contains("+info"),
        "{line}\n{stdout}"
    );
    assert!(finding(&stdout, "maxmemory").contains("[ok  ]"), "{stdout}");
}

#[test]
fn check_warns_about_plain_text_connections_to_other_machines() {
    // 192.0.2.1 is TEST-NET-1: never a real host. Both probes fail (exit 1) and the review
    // still says why plain text to another machine is a problem.
    let env = [
        (
            "DATABASE_URL",
            "postgresql://cascade:pw@192.0.2.1:5432/cascade".to_string(),
        ),
        ("REDIS_URL", "redis://192.0.2.1:6379".to_string()),
        ("REDIS_TIMEOUT", "200ms".to_string()),
    ];
    let (code, stdout) = check_output(&env, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let pg = finding(&stdout, "pg tls");
    assert!(
        pg.contains("[warn]") && pg.contains("sslmode=prefer allows plain text"),
        "{stdout}"
    );
    let redis = finding(&stdout, "redis tls");
    assert!(
        redis.contains("[warn]") && redis.contains("redis://"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(":pw@"),
        "the password is redacted:\n{stdout}"
    );
}

/// Behind PgBouncer in transaction mode a `LISTEN` hears nothing once its transaction ends:
/// PgBouncer is recognised (`PG_POOLER=auto`) and the start refused until PostgreSQL itself is
/// named for it.
#[tokio::test]
async fn behind_pgbouncer_without_a_direct_url_the_start_is_refused_naming_it() {
    let pg = cascade_testkit::PgServer::start().await;
    let bouncer = cascade_testkit::PgBouncer::start(&pg).await;
    let dir = empty_dir();
    let mut command = cascade(&dir);
    command
        .arg("serve")
        .env("DATABASE_URL", bouncer.url("postgres"))
        .env("PORT", "0");
    let (out, _) = run_bounded(command, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PgBouncer"), "{stderr}");
    assert!(stderr.contains("DATABASE_DIRECT_URL"), "{stderr}");
}

/// Behind PgBouncer `statement_timeout` cannot be set at connect: `cascade check` says when the
/// role leaves it at 0, and is satisfied once the role sets it.
#[tokio::test]
async fn check_warns_when_statement_timeout_is_unset_behind_pgbouncer() {
    let pg = cascade_testkit::PgServer::start().await;
    let bouncer = cascade_testkit::PgBouncer::start(&pg).await;
    let env = [
        ("DATABASE_URL", bouncer.url("postgres")),
        ("DATABASE_DIRECT_URL", pg.url("postgres")),
    ];
    let (_, stdout) = check_output(&env, &[]);
    let line = finding(&stdout, "statement_timeout");
    assert!(line.starts_with("  [warn]"), "{stdout}");
    assert!(line.contains("ALTER ROLE"), "{stdout}");

    // A new database: PgBouncer's server connections to the first keep the old setting.
    let admin = pg.client("postgres").await;
    for sql in [
        "ALTER ROLE postgres SET statement_timeout = '7s'",
        "CREATE DATABASE later",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let env = [
        ("DATABASE_URL", bouncer.url("later")),
        ("DATABASE_DIRECT_URL", pg.url("later")),
    ];
    let (_, stdout) = check_output(&env, &[]);
    let line = finding(&stdout, "statement_timeout");
    assert!(
        line.starts_with("  [ok  ]") && line.contains("7s"),
        "{stdout}"
    );
}
