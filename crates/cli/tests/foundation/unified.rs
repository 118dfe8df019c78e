//! `cascade migrate-to-unified`: live cache entries move from a real Redis into PostgreSQL
//! with their TTLs and tags, a dry run writes nothing, the backup holds what was replaced,
//! and a user logged in before the switch stays logged in on a server with no Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use cascade_core::cache::{Backend, Cache, EngineOptions};
use cascade_core::config::{CacheBackend, CacheConfig, RedisConfig, Secret};
use cascade_core::redis::Redis;
use cascade_testkit::{PgServer, RedisServer};
use serde_json::{Value, json};

use crate::common::{cascade, empty_dir, run_bounded};
use crate::identity::{access, call, count, me_status, refresh, register, serve};

const PREFIX: &str = "m:";

fn cache_config() -> CacheConfig {
    CacheConfig {
        backend: CacheBackend::Redis,
        ttls: [("short".to_string(), Duration::from_millis(300))].into(),
        key_names: BTreeMap::new(),
        default_ttl: Duration::from_secs(120),
        cleanup_interval: Duration::from_secs(60),
        key_prefix: PREFIX.to_string(),
        early_refresh: Default::default(),
        speculative_loads: true,
        memory_bytes: cascade_core::config::DEFAULT_MEMORY_BYTES,
    }
}

fn redis_engine(redis: &RedisServer) -> Cache {
    let client = Redis::new(&RedisConfig {
        url: Secret::new(redis.url()),
        display: redis.url(),
        timeout: Duration::from_secs(2),
        ca_cert: None,
        sentinel: None,
        cluster: None,
    })
    .unwrap();
    Cache::new(
        cache_config(),
        Backend::Redis(client),
        EngineOptions::default(),
    )
}

/// `cascade migrate-to-unified ARGS` against `db` and `redis`; (exit code, stdout, stderr).
fn migrate(db: &str, redis: Option<&RedisServer>, args: &[&str]) -> (i32, String, String) {
    let mut command = cascade(&empty_dir());
    command
        .arg("migrate-to-unified")
        .args(args)
        .env("DATABASE_URL", db)
        .env("CACHE_KEY_PREFIX", PREFIX);
    if let Some(redis) = redis {
        command.env("REDIS_URL", redis.url());
    }
    let (out, _) = run_bounded(command, Duration::from_secs(60));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A number of the validation report (its lines are indented: `  copied          3`).
fn report_line(stdout: &str, name: &str) -> u64 {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {name} in the report:\n{stdout}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn migrate_to_unified_without_redis_or_a_database_is_a_usage_error() {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let (code, _, stderr) = migrate(&db, None, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("REDIS_URL"), "{stderr}");

    let redis = RedisServer::start().await;
    let mut command = cascade(&empty_dir());
    command
        .arg("migrate-to-unified")
        .env("REDIS_URL", redis.url());
    let (out, _) = run_bounded(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_entries_move_with_ttl_and_tags_and_a_logged_in_user_stays_logged_in() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let db = pg.fresh_database().await;

    // Before the switch: a Redis-mode server, a user with a cached session.
    let before = serve(&db, Some(&redis), &[("CACHE_KEY_PREFIX", PREFIX)]).await;
    let tokens = register(&before, "erin", "erin's password").await;
    let token = access(&tokens);
    assert_eq!(me_status(&before, &token).await, 200);
    drop(before);

    // Entries of the engine's own making: one tagged, one about to expire (still listed in
    // the tag's set, which lives as long as its longest-lived member).
    let engine = redis_engine(&redis);
    let tags = ["producer:7".to_string()];
    engine
        .set("assets", "k1", &json!({"v": 1}), &tags)
        .await
        .unwrap();
    engine
        .set("short", "gone", &json!("x"), &tags)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A dry run lists what it would copy and writes nothing.
    let (code, stdout, stderr) = migrate(&db, Some(&redis), &["--dry-run"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("would copy assets:k1"), "{stdout}");
    assert!(stdout.contains("would copy session:"), "{stdout}");
    assert!(!stdout.contains("would copy short:gone"), "{stdout}");
    assert!(stdout.contains("sessions: nothing to copy"), "{stdout}");
    // The server may have cached more than these; what the dry run lists is what is copied.
    let listed = stdout
        .lines()
        .filter(|l| l.starts_with("would copy"))
        .count() as u64;
    assert_eq!(
        count(&pg, &db, "SELECT count(*) FROM cache_entries").await,
        0
    );

    // An older row for one key: the copy replaces it, the backup keeps it.
    let name = db.rsplit('/').next().unwrap();
    pg.client(name)
        .await
        .execute(
            "INSERT INTO cache_entries (key, value, tags, expires_at)
             VALUES ('assets:k1', '\\x4f4c44', '{old}', now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    let backup = empty_dir().join("backup.jsonl");
    let backup_arg = backup.to_str().unwrap();
    let (code, stdout, stderr) = migrate(&db, Some(&redis), &["--backup", backup_arg]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(report_line(&stdout, "copied"), listed, "{stdout}");
    assert_eq!(report_line(&stdout, "skipped-expired"), 1, "{stdout}");
    assert_eq!(report_line(&stdout, "read"), listed + 1, "{stdout}");
    assert_eq!(report_line(&stdout, "mismatches"), 0, "{stdout}");

    let lines: Vec<Value> = std::fs::read_to_string(&backup)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, listed, "{lines:?}");
    let k1 = lines.iter().find(|l| l["key"] == "assets:k1").unwrap();
    assert_eq!(k1["before"]["value_hex"], "4f4c44");
    assert_eq!(k1["before"]["tags"], json!(["old"]));
    let session = lines
        .iter()
        .find(|l| l["key"].as_str().unwrap().starts_with("session:"))
        .unwrap();
    assert!(session["before"].is_null(), "{session}");

    // Remaining TTLs kept (under the 120 s the value had), tags kept.
    let left = count(
        &pg,
        &db,
        "SELECT extract(epoch FROM expires_at - now())::int8 FROM cache_entries WHERE key = 'assets:k1'",
    )
    .await;
    assert!((100..=120).contains(&left), "{left} s left");
    // The value as Redis held it (after the 17-byte header), with its tags: an invalidation
    // by tag in unified mode removes it.
    let entry = "SELECT count(*) FROM cache_entries WHERE key = 'assets:k1' \
                 AND substr(value, 18) = convert_to('{\"v\":1}', 'UTF8') \
                 AND tags @> '{producer:7,ns:assets}'";
    assert_eq!(count(&pg, &db, entry).await, 1);
    let mut invalidate = cascade(&empty_dir());
    invalidate
        .args(["cache", "invalidate", "--tag", "producer:7"])
        .env("DATABASE_URL", &db)
        .env("CACHE_BACKEND", "postgres")
        .env("CACHE_KEY_PREFIX", PREFIX);
    let (out, _) = run_bounded(invalidate, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let k1 = "SELECT count(*) FROM cache_entries WHERE key = 'assets:k1'";
    assert_eq!(count(&pg, &db, k1).await, 0);

    // After the switch: no Redis at all, the same tokens work.
    let after = serve(
        &db,
        None,
        &[("CACHE_BACKEND", "postgres"), ("CACHE_KEY_PREFIX", PREFIX)],
    )
    .await;
    let me = call(&after, "GET", "/me", Some(&token), None).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["username"], "erin");
    let refreshed = refresh(&after, &tokens["refresh_token"]).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_eq!(refreshed.body["session_id"], tokens["session_id"]);
    assert_eq!(me_status(&after, &access(&refreshed.body)).await, 200);
}
