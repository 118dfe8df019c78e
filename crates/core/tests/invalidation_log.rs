//! The durable invalidation log (`cache/log.rs`) against real PostgreSQL and Redis: an
//! instance cut off from Redis alone that acknowledges a write and dies leaves no instance
//! serving the old value for longer than the stated bound (nor after a `set`); the log is
//! read on its notification, on the fallback poll, when a peer falls silent and when an
//! instance gets Redis back; connected invalidations and unified mode write nothing to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, Source};
use cascade_core::config::{CacheBackend, CacheConfig};
use cascade_core::db::Db;
use cascade_testkit::{PgServer, Proxy, RedisServer};

mod support;

/// How long an instance may serve the old value once the writer's log row is committed, when
/// its `LISTEN` connection is up: the notification's delivery and one reading of the log, with
/// slack for a loaded test machine.
const NOTIFIED_WITHIN: Duration = Duration::from_secs(1);

/// A long fallback poll: a test that must not pass through the poll sets it.
const NO_POLL: Duration = Duration::from_secs(600);

fn config(prefix: &str, backend: CacheBackend) -> CacheConfig {
    CacheConfig {
        backend,
        ttls: Default::default(),
        key_names: Default::default(),
        default_ttl: Duration::from_secs(60),
        cleanup_interval: Duration::from_secs(60),
        key_prefix: prefix.to_string(),
        early_refresh: Default::default(),
        speculative_loads: true,
        memory_bytes: cascade_core::config::DEFAULT_MEMORY_BYTES,
    }
}

/// An engine on the Redis at `port` (a proxy's, say), with the invalidation log on `db` when
/// one is given, read every `poll` at the latest.
fn engine(port: u16, prefix: &str, db: Option<&Db>, poll: Duration) -> Cache {
    let engine = Cache::new(
        config(prefix, CacheBackend::Redis),
        Backend::Redis(support::redis(&format!("redis://127.0.0.1:{port}"))),
        EngineOptions {
            breaker_cool_down: Duration::from_millis(200),
            invalidation_log_poll: poll,
            ..EngineOptions::default()
        },
    );
    if let Some(db) = db {
        engine.log_invalidations(db.clone());
    }
    engine
}

/// A fresh database with the core migrations and a `kv` table holding `hot` = 0: the pool
/// the log uses, and a client for the loaders and for looking at the log.
async fn database(pg: &PgServer) -> (Db, Arc<tokio_postgres::Client>) {
    let (db, name) = support::migrated_db(pg).await;
    let client = pg.client(&name).await;
    client
        .batch_execute(
            "CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL); INSERT INTO kv VALUES ('hot', 0)",
        )
        .await
        .unwrap();
    (db, Arc::new(client))
}

/// `assets`/`hot` through `engine`; the loader reads `kv`.
async fn read(engine: &Cache, client: &Arc<tokio_postgres::Client>) -> (i64, Source) {
    let client = client.clone();
    let (bytes, source) = engine
        .get_or_load_bytes("assets", "hot", &[], || async move {
            let row = client
                .query_one("SELECT v FROM kv WHERE k = 'hot'", &[])
                .await?;
            Ok::<_, tokio_postgres::Error>(Some(row.get::<_, i64>(0).to_string().into_bytes()))
        })
        .await
        .unwrap();
    let bytes = bytes.expect("a value");
    (String::from_utf8_lossy(&bytes).parse().unwrap(), source)
}

/// Reads until `engine` serves `value` from its in-process tier (for at most 5 s).
async fn warm(engine: &Cache, client: &Arc<tokio_postgres::Client>, value: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while read(engine, client).await != (value, Source::Memory) {
        assert!(
            Instant::now() < deadline,
            "the in-process tier never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until `engine` serves `value`, for at most `bound`; returns how long that took,
/// then checks it keeps serving nothing else for a while.
async fn serves_within(
    engine: &Cache,
    client: &Arc<tokio_postgres::Client>,
    value: i64,
    bound: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let (seen, source) = read(engine, client).await;
        if seen == value {
            break;
        }
        assert!(
            started.elapsed() < bound,
            "still served {seen} (from {source:?}) {:?} after the write, bound {bound:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(
            read(engine, client).await.0,
            value,
            "the old value came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    took
}

/// The write of the tests: `hot` = `value` in PostgreSQL.
async fn write(client: &tokio_postgres::Client, value: i64) {
    client
        .execute("UPDATE kv SET v = $1 WHERE k = 'hot'", &[&value])
        .await
        .unwrap();
}

/// Every log row: (keys, written_by, delivered_by).
async fn rows(client: &tokio_postgres::Client) -> Vec<(Vec<String>, String, Option<String>)> {
    client
        .query(
            "SELECT keys, written_by, delivered_by FROM cache_invalidation_log ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Waits (at most `bound`) until every log row is marked delivered; returns them.
async fn all_delivered(
    client: &tokio_postgres::Client,
    bound: Duration,
) -> Vec<(Vec<String>, String, Option<String>)> {
    let deadline = Instant::now() + bound;
    loop {
        let rows = rows(client).await;
        if !rows.is_empty() && rows.iter().all(|r| r.2.is_some()) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "log rows not delivered within {bound:?}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A row as a writer whose notification nobody heard would leave it.
async fn log_without_notification(client: &tokio_postgres::Client, prefix: &str) {
    client
        .execute(
            "INSERT INTO cache_invalidation_log (key_prefix, keys, written_by)
             VALUES ($1, ARRAY['assets:hot'], 'gone')",
            &[&prefix],
        )
        .await
        .unwrap();
}

/// Real servers and two instances with the log: A reaches Redis through a proxy the test can
/// cut, B directly.
struct Pair {
    _pg: PgServer,
    server: RedisServer,
    proxy: Proxy,
    client: Arc<tokio_postgres::Client>,
    a: Cache,
    b: Cache,
}

async fn pair(prefix: &str) -> Pair {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let proxy = Proxy::start(server.port()).await;
    let (db, client) = database(&pg).await;
    let a = engine(proxy.port(), prefix, Some(&db), NO_POLL);
    let b = engine(server.port(), prefix, Some(&db), NO_POLL);
    Pair {
        _pg: pg,
        server,
        proxy,
        client,
        a,
        b,
    }
}

/// The hole the log closes: A loses Redis alone (B reads it fine), acknowledges a write and
/// is killed before it can replay its invalidation. B serves the new value within
/// [`NOTIFIED_WITHIN`] (the poll is off: only the notification can tell it), deletes the old
/// one from Redis for everybody and marks the row delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_redis_that_dies_after_a_write_leaves_no_stale_value_behind() {
    let Pair {
        _pg,
        server,
        proxy,
        client,
        a,
        b,
    } = pair("il:").await;
    warm(&a, &client, 0).await;
    warm(&b, &client, 0).await;

    proxy.cut();
    write(&client, 1).await;
    let started = Instant::now();
    a.invalidate("assets", "hot").await; // cannot reach Redis: logged
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the invalidation took {:?}",
        started.elapsed()
    );
    // Killed right after acknowledging: it never replays.
    a.stop_bus();
    drop(a);

    let took = serves_within(&b, &client, 1, NOTIFIED_WITHIN).await;
    eprintln!("B served the new value {took:?} after A's acknowledgement");

    let delivered = all_delivered(&client, Duration::from_secs(2)).await;
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    let (keys, written_by, delivered_by) = &delivered[0];
    assert_eq!(keys, &["assets:hot".to_string()]);
    assert_ne!(
        delivered_by.as_deref(),
        Some(written_by.as_str()),
        "A is dead: B delivered it"
    );

    // Redis no longer holds the old value: an instance without the log (a fresh in-process
    // tier, reading Redis first) does not get it.
    let c = engine(server.port(), "il:", None, NO_POLL);
    assert_eq!(read(&c, &client).await.0, 1);
}

/// A write-through (`set`) that cannot reach Redis is logged like an invalidation: the other
/// instance stops serving the old value it holds in process and in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_cannot_reach_redis_is_logged_too() {
    let p = pair("st:").await;
    warm(&p.b, &p.client, 0).await;

    p.proxy.cut();
    write(&p.client, 1).await;
    p.a.set("assets", "hot", &1i64, &[]).await.unwrap();
    // Stopped right after (no bus loop, so no replay: it reads nothing).
    p.a.stop_bus();
    serves_within(&p.b, &p.client, 1, NOTIFIED_WITHIN).await;
    assert_eq!(
        all_delivered(&p.client, Duration::from_secs(2)).await.len(),
        1
    );
}

/// A write acknowledged while the instance reaches Redis logs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_invalidation_writes_nothing_to_the_log() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let (db, client) = database(&pg).await;
    let a = engine(server.port(), "ok:", Some(&db), NO_POLL);
    let b = engine(server.port(), "ok:", Some(&db), NO_POLL);
    warm(&b, &client, 0).await;
    for value in 1..=5 {
        write(&client, value).await;
        a.invalidate("assets", "hot").await;
        assert_eq!(read(&b, &client).await.0, value);
    }
    assert!(rows(&client).await.is_empty());
}

/// A row whose notification nobody heard is applied by the fallback poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_notification_was_missed_is_applied_by_the_poll() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let (db, client) = database(&pg).await;
    let poll = Duration::from_millis(300);
    let b = engine(server.port(), "po:", Some(&db), poll);
    warm(&b, &client, 0).await;

    write(&client, 1).await;
    log_without_notification(&client, "po:").await;
    serves_within(&b, &client, 1, poll + NOTIFIED_WITHIN).await;
    let delivered = all_delivered(&client, Duration::from_secs(2)).await;
    assert_eq!(delivered[0].1, "gone");
}

/// A peer that stops being heard on the bus is a reason to read the log: the row it left
/// without a notification is applied within the bus's liveness window (1 s) and a check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_falling_silent_makes_the_others_read_the_log() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let (db, client) = database(&pg).await;
    let b = engine(server.port(), "si:", Some(&db), NO_POLL);
    let peer = engine(server.port(), "si:", None, NO_POLL);
    warm(&b, &client, 0).await;
    // B has heard the peer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.live_instances() < 2 {
        assert!(Instant::now() < deadline, "B never heard the peer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    write(&client, 1).await;
    log_without_notification(&client, "si:").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read(&b, &client).await,
        (0, Source::Memory),
        "nothing told B yet: this test would prove nothing"
    );
    peer.stop_bus();
    serves_within(&b, &client, 1, Duration::from_secs(1) + NOTIFIED_WITHIN).await;
}

/// An instance that gets Redis back after its own outage reads the log (and delivers what
/// it finds) without waiting for the poll; the writer's own replay marks its row delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_makes_an_instance_read_the_log_and_the_writer_marks_its_own_row() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let proxy = Proxy::start(server.port()).await;
    let (db, client) = database(&pg).await;
    let a = engine(proxy.port(), "rb:", Some(&db), NO_POLL);
    warm(&a, &client, 0).await;

    proxy.cut();
    write(&client, 1).await;
    a.invalidate("assets", "hot").await;
    // Another instance's row that nobody was told about.
    write(&client, 2).await;
    log_without_notification(&client, "rb:").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();

    let delivered = all_delivered(&client, Duration::from_secs(5)).await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    let own = &delivered[0];
    assert_eq!(own.2.as_deref(), Some(own.1.as_str()), "{own:?}");
    assert_eq!(delivered[1].2.as_deref(), Some(own.1.as_str()));
    serves_within(&a, &client, 2, NOTIFIED_WITHIN).await;
    let c = engine(server.port(), "rb:", None, NO_POLL);
    assert_eq!(read(&c, &client).await.0, 2);
}

/// Unified mode (`CACHE_BACKEND=postgres`) has no log: the shared tier is the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unified_mode_keeps_no_log() {
    let pg = PgServer::start().await;
    let (db, client) = database(&pg).await;
    let options = EngineOptions {
        lease_wait: Duration::from_secs(15),
        ..EngineOptions::default()
    };
    let a = Cache::new(
        config("un:", CacheBackend::Postgres),
        Backend::Postgres(db.clone()),
        options.clone(),
    );
    let b = Cache::new(
        config("un:", CacheBackend::Postgres),
        Backend::Postgres(db.clone()),
        options,
    );
    a.log_invalidations(db.clone());
    b.log_invalidations(db.clone());
    warm(&b, &client, 0).await;
    write(&client, 1).await;
    a.invalidate("assets", "hot").await;
    assert_eq!(read(&b, &client).await.0, 1);
    assert!(rows(&client).await.is_empty());
}
