//! The cache engine against real Redis and PostgreSQL: stampedes, the stale-set race,
//! cross-instance reads after writes, Redis killed and paused, TTLs, tags, negative caching.
//! Unified mode (`CACHE_BACKEND=postgres`, no Redis) runs the same bodies on the PostgreSQL
//! tier: stampede and stale sets, reads after writes across instances, TTLs, tags and cleanup,
//! early refresh, and invalidations over the LISTEN/NOTIFY bus.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, NamespaceStats, Source};
use cascade_core::config::{CacheConfig, RedisConfig, Secret};
use cascade_core::db::Db;
use cascade_core::redis::Redis;
use cascade_core::shutdown::Shutdown;
use cascade_testkit::{PgServer, RedisServer};

mod scenarios;
mod support;

use scenarios::*;

fn redis_engine(server: &RedisServer, prefix: &str) -> Cache {
    redis_engine_at(&server.url(), prefix)
}

/// An engine on the Redis at `url` (a proxy in front of a test server, say).
fn redis_engine_at(url: &str, prefix: &str) -> Cache {
    let redis = support::redis(url);
    Cache::new(
        config(prefix),
        Backend::Redis(redis),
        EngineOptions {
            negative_ttl: Duration::from_millis(300),
            breaker_cool_down: Duration::from_millis(200),
            ..EngineOptions::default()
        },
    )
}

fn memory_engine() -> Cache {
    Cache::new(
        config("t:"),
        Backend::Memory,
        EngineOptions {
            negative_ttl: Duration::from_millis(300),
            ..EngineOptions::default()
        },
    )
}

/// What the in-process tier holds, as `/metrics` reports it: its entries, the bytes its bound
/// counts (key, body and 64 per entry) and the bound; an invalidated key leaves it.
#[tokio::test]
async fn the_in_process_tier_reports_what_it_holds_against_its_bound() {
    let engine = memory_engine();
    let empty = engine.memory_usage().expect("an in-process tier");
    assert_eq!(
        (empty.entries, empty.weighted_bytes, empty.capacity_bytes),
        (0, 0, cascade_core::config::DEFAULT_MEMORY_BYTES)
    );
    let body = vec![b'x'; 1000];
    for i in 0..10 {
        let body = body.clone();
        engine
            .get_or_load_bytes("sized", &format!("k{i}"), &[], || async move {
                Ok::<_, std::convert::Infallible>(Some(body))
            })
            .await
            .unwrap();
    }
    let full = engine.memory_usage().unwrap();
    assert_eq!(full.entries, 10);
    // Each entry: its key (under 64 bytes here), its stored body (the value and a header)
    // and 64.
    assert!(
        (10 * (1000 + 64)..10 * (1000 + 64 + 64 + 64)).contains(&full.weighted_bytes),
        "{full:?}"
    );
    for i in 0..4 {
        engine.invalidate("sized", &format!("k{i}")).await;
    }
    let left = engine.memory_usage().unwrap();
    assert_eq!(left.entries, 6, "{left:?}");
    assert_eq!(left.weighted_bytes * 10, full.weighted_bytes * 6);

    // No in-process tier, nothing to report.
    let server = RedisServer::start().await;
    let tierless = Cache::new(
        config("none:"),
        Backend::Redis(support::redis(&server.url())),
        EngineOptions {
            memory_bytes: 0,
            ..EngineOptions::default()
        },
    );
    assert_eq!(tierless.memory_usage(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_key_under_1000_concurrent_requests_on_two_instances_loads_once() {
    let server = RedisServer::start().await;
    let engines = [redis_engine(&server, "s:"), redis_engine(&server, "s:")];
    assert_eq!(
        concurrent_cold_loads(&engines, 1000).await,
        1,
        "the loader ran more than once"
    );
}

/// Each worker thread answers from its own copies of what it read (the front): a `set` on
/// another thread must reach the next read on this one, and another key still reads its
/// value (that its copy is kept is `front.rs`'s unit test: no API tells a copy from moka).
#[test]
fn a_set_on_one_thread_reaches_the_next_read_on_another_that_holds_a_copy() {
    async fn read(engine: &Cache, key: &str) -> (String, Source) {
        let (bytes, source) = engine
            .get_or_load_bytes(NS, key, &[], || async {
                Ok::<_, std::convert::Infallible>(Some(b"\"loaded\"".to_vec()))
            })
            .await
            .unwrap();
        (String::from_utf8(bytes.unwrap().to_vec()).unwrap(), source)
    }
    const NS: &str = "front";
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let engine = memory_engine();
    let (copied, set_done) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
    let reader = std::thread::spawn({
        let engine = engine.clone();
        let (copied, set_done) = (copied.0, set_done.1);
        move || {
            runtime().block_on(async {
                for key in ["k", "other"] {
                    assert_eq!(read(&engine, key).await.1, Source::Loaded);
                    // Twice from memory: the second from this thread's copy.
                    assert_eq!(read(&engine, key).await.1, Source::Memory);
                    assert_eq!(read(&engine, key).await.1, Source::Memory);
                }
                copied.send(()).unwrap();
                set_done.recv().unwrap();
                (read(&engine, "k").await, read(&engine, "other").await)
            })
        }
    });
    if copied.1.recv().is_err() {
        // The reader failed before its copies: its own panic says why.
        std::panic::resume_unwind(reader.join().unwrap_err());
    }
    runtime()
        .block_on(engine.set(NS, "k", &"set", &[]))
        .unwrap();
    set_done.0.send(()).unwrap();
    let (k, other) = reader.join().unwrap();
    assert_eq!(
        k,
        ("\"set\"".to_string(), Source::Memory),
        "served the copy from before the set"
    );
    assert_eq!(other, ("\"loaded\"".to_string(), Source::Memory));
}

#[tokio::test]
async fn a_cold_key_in_memory_mode_loads_once() {
    assert_eq!(concurrent_cold_loads(&[memory_engine()], 1000).await, 1);
}

#[tokio::test]
async fn the_stale_set_race_never_installs_the_old_value_with_redis() {
    let server = RedisServer::start().await;
    for (i, by) in [By::Key, By::Tag, By::Namespace].into_iter().enumerate() {
        let prefix = format!("r{i}:");
        stale_set_is_refused(
            redis_engine(&server, &prefix),
            redis_engine(&server, &prefix),
            by,
            None,
        )
        .await;
    }
}

/// The same race where the namespace's lookups have mostly missed lately, so a lookup is one
/// script that reads or leases (no plain `GET` first): a key, tag or namespace invalidation
/// between the lease and the fill still refuses the fill.
#[tokio::test]
async fn the_stale_set_race_never_installs_the_old_value_when_lookups_lean_to_misses() {
    let server = RedisServer::start().await;
    let mut conn = raw_redis(&server).await;
    for (i, by) in [By::Key, By::Tag, By::Namespace].into_iter().enumerate() {
        let prefix = format!("m{i}:");
        let engine = redis_engine(&server, &prefix);
        for cold in 0..32 {
            engine
                .get_or_load("assets", &format!("cold-{cold}"), &[], || async {
                    Ok::<_, std::convert::Infallible>(Some(cold))
                })
                .await
                .unwrap();
        }
        stale_set_is_refused(engine, redis_engine(&server, &prefix), by, Some(&mut conn)).await;
    }
}

#[tokio::test]
async fn the_stale_set_race_never_installs_the_old_value_in_memory() {
    for by in [By::Key, By::Tag, By::Namespace] {
        let engine = memory_engine();
        stale_set_is_refused(engine.clone(), engine, by, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_is_seen_by_the_next_read_on_the_other_while_the_key_is_hot() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let (a, b) = (redis_engine(&server, "x:"), redis_engine(&server, "x:"));
    write_on_a_read_on_b(&pg, a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_is_seen_by_the_other_with_the_postgres_backend() {
    let pg = PgServer::start().await;
    let (a, db) = pg_engine(&pg).await;
    let b = Cache::new(
        config("pg:"),
        Backend::Postgres(db),
        EngineOptions::default(),
    );
    write_on_a_read_on_b(&pg, a, b).await;
}

#[tokio::test]
async fn redis_killed_mid_run_every_read_succeeds_and_hits_resume_after_restart() {
    let pg = PgServer::start().await;
    let mut server = RedisServer::start().await;
    let (client, _) = kv(&pg).await;
    let engine = redis_engine(&server, "k:");
    let read = || {
        engine.get_or_load_bytes("assets", "hot", &[], || async {
            read_kv(&client)
                .await
                .map(|v| v.map(|v| v.to_string().into_bytes()))
        })
    };
    // Once the bus is heard, hot reads are served by the in-process tier.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read().await.unwrap().1 != Source::Memory {
        assert!(
            Instant::now() < deadline,
            "the in-process tier never served a hit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    server.kill();
    // Without the bus the in-process tier cannot know about other instances' writes: once
    // the trust window has passed it is bypassed, and every read goes to the source.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    for _ in 0..50 {
        let (value, source) = read().await.expect("reads succeed without Redis");
        assert_eq!(value.as_deref(), Some(&b"0"[..]));
        assert_eq!(
            source,
            Source::Loaded,
            "served from an untrusted in-process tier"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "reads without Redis took {:?}",
        started.elapsed()
    );

    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if read().await.unwrap().1 != Source::Loaded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache hits did not resume after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_paused_redis_never_serves_a_value_invalidated_while_it_was_away() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let (client, _) = kv(&pg).await;
    let engine = redis_engine(&server, "p:");
    let read = || engine.get_or_load("assets", "hot", &[], || read_kv(&client));
    assert_eq!(read().await.unwrap(), Some(0));

    server.pause();
    client
        .execute("UPDATE kv SET v = 1 WHERE k = 'hot'", &[])
        .await
        .unwrap();
    engine.invalidate("assets", "hot").await; // cannot reach Redis: remembered
    assert_eq!(read().await.unwrap(), Some(1));
    server.resume();

    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(
            read().await.unwrap(),
            Some(1),
            "served the value invalidated while Redis was paused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And Redis is trusted again: the fresh value is cached there.
    assert_eq!(engine.get::<i64>("assets", "hot").await.unwrap(), Some(1));
}

#[tokio::test]
async fn ttl_tags_namespaces_and_negative_caching_with_redis() {
    let server = RedisServer::start().await;
    ttl_tags_and_negative(redis_engine(&server, "n:")).await;
}

/// Engines that wait for and hold a lease for 60 s: far past the test's bound.
fn patient(engine: impl Fn(EngineOptions) -> Cache) -> Cache {
    engine(EngineOptions {
        lease_ttl: Duration::from_secs(60),
        lease_wait: Duration::from_secs(60),
        ..EngineOptions::default()
    })
}

#[tokio::test]
async fn a_failed_load_gives_its_lease_back_with_redis() {
    let server = RedisServer::start().await;
    let on_redis = |options| {
        Cache::new(
            config("rel:"),
            Backend::Redis(support::redis(&server.url())),
            options,
        )
    };
    a_failed_load_gives_its_lease_back(patient(on_redis), patient(on_redis)).await;
}

#[tokio::test]
async fn a_failed_load_gives_its_lease_back_on_postgres() {
    let pg = PgServer::start().await;
    let (db, _) = support::migrated_db(&pg).await;
    let on_pg = |options| Cache::new(config("pg:"), Backend::Postgres(db.clone()), options);
    a_failed_load_gives_its_lease_back(patient(on_pg), patient(on_pg)).await;
}

#[tokio::test]
async fn ttl_tags_namespaces_and_negative_caching_in_memory() {
    ttl_tags_and_negative(memory_engine()).await;
}

/// A waiter gives up on another instance's load after `lease_wait` and loads itself; on a
/// machine loaded by parallel builds, PostgreSQL round trips through the small test pool can
/// take seconds, so the tests that count loads wait longer than production would.
fn pg_options() -> EngineOptions {
    EngineOptions {
        negative_ttl: Duration::from_millis(300),
        lease_wait: Duration::from_secs(15),
        ..EngineOptions::default()
    }
}

/// An engine on the PostgreSQL tier of a fresh, migrated database.
async fn pg_engine(pg: &PgServer) -> (Cache, Db) {
    let (db, _) = support::migrated_db(pg).await;
    let engine = Cache::new(config("pg:"), Backend::Postgres(db.clone()), pg_options());
    (engine, db)
}

#[tokio::test]
async fn the_postgres_tier_refuses_stale_sets_and_loads_a_cold_key_once() {
    let pg = PgServer::start().await;
    let (a, db) = pg_engine(&pg).await;
    let b = Cache::new(config("pg:"), Backend::Postgres(db.clone()), pg_options());
    for by in [By::Key, By::Tag, By::Namespace] {
        a.invalidate("assets", "race").await;
        stale_set_is_refused(a.clone(), b.clone(), by, None).await;
    }

    // The PostgreSQL tier shares the (small, 8-connection) test pool with the loader: the
    // waiters' polls and the lease holder's fill take turns on it. 24 concurrent callers (3 per
    // connection) keep the fill well inside the acquire timeout on a loaded machine; 50 once
    // starved it past the lease's life under a parallel release build, and a second caller
    // loaded (what the lease allows when a fill cannot be stored).
    assert_eq!(concurrent_cold_loads(&[a, b], 24).await, 1);
}

#[tokio::test]
async fn ttl_tags_namespaces_and_negative_caching_on_postgres_with_cleanup() {
    let pg = PgServer::start().await;
    let (engine, db) = pg_engine(&pg).await;
    ttl_tags_and_negative(engine.clone()).await;

    let count = || async {
        let conn = db.conn().await.unwrap();
        conn.query_one(
            "SELECT count(*) FROM cache_entries WHERE expires_at <= now()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        count().await > 0,
        "expired rows are still in the table before cleanup"
    );
    let shutdown = Shutdown::new();
    let cleanup = tokio::spawn(
        engine
            .clone()
            .run_cleanup(Duration::from_millis(100), shutdown.signal()),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while count().await > 0 {
        assert!(
            Instant::now() < deadline,
            "cleanup did not remove expired rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.trigger();
    cleanup.await.unwrap();
}

/// A hot key of an early-refresh namespace is reloaded before it expires: after the first
/// load, no reader ever waits for a miss. Returns the reads made and the namespace's stats.
async fn hot_keys_refresh_before_expiry(engine: Cache) -> (u64, NamespaceStats) {
    let loads = Arc::new(AtomicUsize::new(0));
    let read = || {
        let (engine, loads) = (engine.clone(), loads.clone());
        async move {
            engine
                .get_or_load_bytes("early", "k", &[], || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    Ok::<_, std::convert::Infallible>(Some(b"v".to_vec()))
                })
                .await
                .unwrap()
        }
    };
    read().await;
    let mut reads = 1;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        read().await;
        reads += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let stats: Vec<_> = engine
        .stats()
        .into_iter()
        .filter(|s| s.namespace == "early")
        .collect();
    assert_eq!(
        stats[0].misses, 1,
        "a reader waited for a miss after the first load: {stats:?}"
    );
    assert!(
        stats[0].early_refreshes >= 2,
        "the key was not refreshed early: {stats:?}"
    );
    assert!(loads.load(Ordering::SeqCst) >= 3);
    (reads, stats[0].clone())
}

#[tokio::test]
async fn hot_keys_refresh_before_expiry_in_memory() {
    let (reads, stats) = hot_keys_refresh_before_expiry(memory_engine()).await;
    // Each read counted once: the first miss, the reads that refreshed (their entry was due:
    // not a hit), the hits.
    assert_eq!(
        stats.misses + stats.early_refreshes + stats.near_hits,
        reads,
        "{stats:?}"
    );
}

#[tokio::test]
async fn hot_keys_refresh_before_expiry_with_redis() {
    let server = RedisServer::start().await;
    hot_keys_refresh_before_expiry(redis_engine(&server, "e:")).await;
}

#[tokio::test]
async fn hot_keys_refresh_before_expiry_on_postgres() {
    let pg = PgServer::start().await;
    hot_keys_refresh_before_expiry(pg_engine(&pg).await.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_never_serves_a_value_invalidated_by_another_instance_while_it_was_away() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let (client, db) = kv(&pg).await;
    let (a, b) = (redis_engine(&server, "q:"), redis_engine(&server, "q:"));
    let b_reader = pg.client(&db).await;
    assert_eq!(
        a.get_or_load("assets", "hot", &[], || read_kv(&client))
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        b.get_or_load("assets", "hot", &[], || read_kv(&b_reader))
            .await
            .unwrap(),
        Some(0)
    );

    server.pause();
    client
        .execute("UPDATE kv SET v = 1 WHERE k = 'hot'", &[])
        .await
        .unwrap();
    a.invalidate("assets", "hot").await; // cannot reach Redis: remembered by A only
    // A crashes before Redis comes back: its undelivered invalidation dies with it.
    drop(a);
    assert_eq!(
        b.get_or_load("assets", "hot", &[], || read_kv(&b_reader))
            .await
            .unwrap(),
        Some(1)
    );
    server.resume();

    // B reads as fast as it can while A replays in the background: never the old value.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let seen = b
            .get_or_load("assets", "hot", &[], || read_kv(&b_reader))
            .await
            .unwrap();
        assert_eq!(
            seen,
            Some(1),
            "instance B served the value A invalidated while Redis was paused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_entries_from_before_it_are_revalidated() {
    let pg = PgServer::start().await;
    let server = RedisServer::start().await;
    let proxy = cascade_testkit::Proxy::start(server.port()).await;
    let (client, db) = kv(&pg).await;
    let via_proxy = |prefix: &str| {
        let url = format!("redis://127.0.0.1:{}", proxy.port());
        let redis = Redis::new(&RedisConfig {
            url: Secret::new(url.clone()),
            display: url,
            timeout: Duration::from_millis(200),
            ca_cert: None,
            sentinel: None,
            cluster: None,
        })
        .unwrap();
        Cache::new(
            config(prefix),
            Backend::Redis(redis),
            EngineOptions {
                breaker_cool_down: Duration::from_millis(200),
                ..EngineOptions::default()
            },
        )
    };
    let (a, b) = (via_proxy("w:"), via_proxy("w:"));
    let b_reader = pg.client(&db).await;
    assert_eq!(
        a.get_or_load("assets", "hot", &[], || read_kv(&client))
            .await
            .unwrap(),
        Some(0)
    );

    // Redis keeps running with its data, but nobody can reach it.
    proxy.cut();
    client
        .execute("UPDATE kv SET v = 1 WHERE k = 'hot'", &[])
        .await
        .unwrap();
    a.invalidate("assets", "hot").await; // never reaches Redis
    drop(a); // and A dies before it could replay it
    assert_eq!(
        b.get_or_load("assets", "hot", &[], || read_kv(&b_reader))
            .await
            .unwrap(),
        Some(1)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();

    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let seen = b
            .get_or_load("assets", "hot", &[], || read_kv(&b_reader))
            .await
            .unwrap();
        assert_eq!(
            seen,
            Some(1),
            "B served an entry stored before the partition and invalidated during it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_namespace_invalidations_reach_the_other_instances_in_process_tier() {
    let server = RedisServer::start().await;
    let (a, b) = (redis_engine(&server, "g:"), redis_engine(&server, "g:"));
    invalidations_reach_the_other_in_process_tier(a, b).await;
}

/// Unified mode: the bus is PostgreSQL's LISTEN/NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_namespace_invalidations_reach_the_other_instance_on_postgres() {
    let pg = PgServer::start().await;
    let (a, db) = pg_engine(&pg).await;
    let b = Cache::new(config("pg:"), Backend::Postgres(db), pg_options());
    invalidations_reach_the_other_in_process_tier(a, b).await;
}

/// A tag and a namespace invalidation through A: B's in-process copy is dropped at once.
async fn invalidations_reach_the_other_in_process_tier(a: Cache, b: Cache) {
    let loads = Arc::new(AtomicUsize::new(0));
    let read = |engine: &Cache| {
        let (engine, loads) = (engine.clone(), loads.clone());
        async move {
            engine
                .get_or_load_bytes("assets", "k", &["producer:7".to_string()], || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(Some(b"v".to_vec()))
                })
                .await
                .unwrap()
                .1
        }
    };
    // Warm B's in-process tier.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read(&b).await != Source::Memory {
        assert!(
            Instant::now() < deadline,
            "B's in-process tier never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for invalidate in [true, false] {
        let before = loads.load(Ordering::SeqCst);
        if invalidate {
            a.invalidate_tag("producer:7").await;
        } else {
            a.invalidate_namespace("assets").await;
        }
        assert_ne!(
            read(&b).await,
            Source::Memory,
            "B served its in-process copy after A's invalidation"
        );
        assert_eq!(loads.load(Ordering::SeqCst), before + 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while read(&b).await != Source::Memory {
            assert!(
                Instant::now() < deadline,
                "B's in-process tier never served again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A key with no tag of its own: only its namespace's generation hides B's copy.
    let plain = |engine: &Cache| {
        let engine = engine.clone();
        async move {
            engine
                .get_or_load_bytes("assets", "plain", &[], || async move {
                    Ok::<_, std::convert::Infallible>(Some(b"p".to_vec()))
                })
                .await
                .unwrap()
                .1
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while plain(&b).await != Source::Memory {
        assert!(Instant::now() < deadline, "B never served the plain key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.invalidate_namespace("assets").await;
    assert_ne!(
        plain(&b).await,
        Source::Memory,
        "B served its in-process copy of an untagged key after A invalidated its namespace"
    );
}

/// An invalidation storm (far more distinct keys than the engine remembers) between a slow
/// load's start and its end must not let that load install the value it read before the
/// write: the engine may forget old invalidations, never in a way that admits a stale value.
#[tokio::test]
async fn an_invalidation_storm_does_not_let_a_slow_load_install_its_stale_value() {
    let engine = memory_engine();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .get_or_load("assets", "storm", &[], || async move {
                    let _ = started_tx.send(());
                    let _ = release_rx.await;
                    Ok::<_, std::convert::Infallible>(Some("old".to_string()))
                })
                .await
                .unwrap()
        })
    };
    started_rx.await.unwrap();
    engine.invalidate("assets", "storm").await;
    // 150,000 other keys invalidated, in batches, while the load is still running.
    let others: Vec<String> = (0..150_000).map(|i| format!("other-{i}")).collect();
    for chunk in others.chunks(5_000) {
        let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
        engine.invalidate_keys("assets", &keys).await;
    }
    release_tx.send(()).unwrap();
    assert_eq!(slow.await.unwrap().as_deref(), Some("old"));
    assert_eq!(
        engine.get::<String>("assets", "storm").await.unwrap(),
        None,
        "the value read before the write was installed"
    );
}

/// Reads `assets`/`k` through `engine`; the loader answers the current `version`.
async fn read_version(engine: &Cache, version: &Arc<AtomicUsize>) -> (String, Source) {
    let version = version.clone();
    let (bytes, source) = engine
        .get_or_load_bytes("assets", "k", &[], || async move {
            let v = version.load(Ordering::SeqCst).to_string();
            Ok::<_, std::convert::Infallible>(Some(v.into_bytes()))
        })
        .await
        .unwrap();
    let bytes = bytes.expect("a value");
    (String::from_utf8_lossy(&bytes).into_owned(), source)
}

/// Reads until `engine`'s in-process tier serves, for at most `bound`.
async fn until_served_in_process(engine: &Cache, version: &Arc<AtomicUsize>, bound: Duration) {
    let deadline = Instant::now() + bound;
    while read_version(engine, version).await.1 != Source::Memory {
        assert!(
            Instant::now() < deadline,
            "the in-process tier did not serve within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscription that goes silent without closing (half-open: no error, no end of stream)
/// is replaced once nothing was heard on it for the silence bound, and a new subscription
/// that hangs is abandoned at the subscribe deadline. Then the instance trusts its
/// in-process tier again and the other instance's invalidations reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_bus_subscription_is_replaced_and_invalidations_flow_again() {
    let server = RedisServer::start().await;
    let proxy = cascade_testkit::StallProxy::start(server.port()).await;
    let a = redis_engine_at(&format!("redis://127.0.0.1:{}", proxy.port()), "h:");
    let b = redis_engine(&server, "h:");
    let version = Arc::new(AtomicUsize::new(0));
    until_served_in_process(&a, &version, Duration::from_secs(5)).await;

    // A's subscription goes silent, and so does every one it opens meanwhile.
    proxy.stall_subscriptions(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(
        read_version(&a, &version).await.1,
        Source::Memory,
        "A trusted its in-process tier without hearing the bus"
    );
    proxy.stall_subscriptions(false);

    // Silence bound (500 ms) + subscribe deadline (2 s) + warm-up (300 ms), with slack.
    until_served_in_process(&a, &version, Duration::from_secs(8)).await;
    for v in 1..=5 {
        version.store(v, Ordering::SeqCst);
        b.invalidate("assets", "k").await;
        assert_eq!(
            read_version(&a, &version).await.0,
            v.to_string(),
            "A served a value B invalidated"
        );
        until_served_in_process(&a, &version, Duration::from_secs(5)).await;
    }
}

/// A plain connection to the test server, for looking at what the engine left in Redis. Its
/// response deadline is generous (pipelines of thousands of commands on a busy machine);
/// the tests that need a tighter bound set their own.
async fn raw_redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// How many members the tag set `key` holds, whatever kind of set it is.
async fn tag_set_size(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(conn).await.unwrap();
    let count = if kind == "set" { "SCARD" } else { "ZCARD" };
    redis::cmd(count).arg(key).query_async(conn).await.unwrap()
}

/// Reads of ever new keys (anonymous reads of random ids) must not grow the tag sets beyond
/// what is cached: members whose values expired leave their sets.
#[tokio::test]
async fn tag_sets_stay_bounded_while_distinct_keys_come_and_expire() {
    let server = RedisServer::start().await;
    let engine = redis_engine(&server, "ts:");
    let (rounds, per_round) = (8, 250);
    for round in 0..rounds {
        for i in 0..per_round {
            engine
                .get_or_load(
                    "short",
                    &format!("{round}-{i}"),
                    &["producer:1".to_string()],
                    || async { Ok::<_, std::convert::Infallible>(Some(1)) },
                )
                .await
                .unwrap();
        }
        // Every value of this round expires (the `short` namespace lives 300 ms).
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut conn = raw_redis(&server).await;
    for key in ["ts:tag:ns:short", "ts:tag:producer:1"] {
        let size = tag_set_size(&mut conn, key).await;
        assert!(
            size <= per_round + 64,
            "{key} holds {size} members after {} keys came and expired",
            rounds * per_round
        );
    }
}

/// The fill indexes nothing (the lease entered the key in its tag sets): a value filled at the
/// end of a slow load must still expire no later than its entries in its tag and namespace
/// sets, or a tag invalidation after they were trimmed would miss it.
#[tokio::test]
async fn a_value_filled_after_a_slow_load_expires_no_later_than_its_tag_entries() {
    let server = RedisServer::start().await;
    let engine = redis_engine(&server, "slow:");
    engine
        .get_or_load("early", "k", &["producer:1".to_string()], || async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(Some(1))
        })
        .await
        .unwrap();
    let mut conn = raw_redis(&server).await;
    // Both read by one script, so no time passes between them.
    let (value_ttl, secs, micros): (i64, u64, u64) = redis::cmd("EVAL")
        .arg("local t = redis.call('TIME') return {redis.call('PTTL', KEYS[1]), tonumber(t[1]), tonumber(t[2])}")
        .arg(1)
        .arg("slow:early:k")
        .query_async(&mut conn)
        .await
        .unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    // The `early` namespace lives 800 ms: counted from the lease, the load took 300 of them.
    assert!(
        (1..=520).contains(&value_ttl),
        "the value lives {value_ttl} ms more"
    );
    for tag in ["slow:tag:ns:early", "slow:tag:producer:1"] {
        let score: f64 = redis::cmd("ZSCORE")
            .arg(tag)
            .arg("slow:early:k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            score as u64 >= now_ms + value_ttl as u64,
            "{tag} lets the key go at {score}, before its value expires at {}",
            now_ms + value_ttl as u64
        );
    }
}

/// A namespace invalidation over 200,000 keys returns, deletes them all, and never holds
/// Redis for long: a PING sent meanwhile is answered within 1 s, and Redis's own slow log
/// (which times each command, scripts included) records nothing of 250 ms or more. (One
/// script deleting the whole set held Redis for more than a second; a batch takes about a
/// millisecond, the bound leaves room for a machine busy with parallel builds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_invalidation_over_200_000_keys_never_blocks_redis() {
    const KEYS: usize = 200_000;
    let server = RedisServer::start().await;
    let engine = redis_engine(&server, "big:");
    let mut conn = raw_redis(&server).await;
    let loads = Arc::new(AtomicUsize::new(0));
    let load = |key: String| {
        let (engine, loads) = (engine.clone(), loads.clone());
        async move {
            engine
                .get_or_load("assets", &key, &[], || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(Some(1))
                })
                .await
                .unwrap()
        }
    };
    // A few keys through the engine; the rest written as the engine indexes them, in
    // pipelines (200,000 loads would take minutes).
    for i in 0..10 {
        load(format!("e{i}")).await;
    }
    let tag = "big:tag:ns:assets";
    let sorted = {
        let kind: String = redis::cmd("TYPE")
            .arg(tag)
            .query_async(&mut conn)
            .await
            .unwrap();
        kind == "zset"
    };
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let expiry = secs * 1000 + micros / 1000 + 600_000;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(2_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let key = format!("big:assets:{i}");
            pipe.cmd("SET")
                .arg(&key)
                .arg("x")
                .arg("PX")
                .arg(600_000)
                .ignore();
            if sorted {
                pipe.cmd("ZADD").arg(tag).arg(expiry).arg(&key).ignore();
            } else {
                pipe.cmd("SADD").arg(tag).arg(&key).ignore();
            }
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    assert!(tag_set_size(&mut conn, tag).await >= KEYS as u64);
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(250_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();

    let invalidation = tokio::spawn({
        let engine = engine.clone();
        async move { engine.invalidate_namespace("assets").await }
    });
    let mut pings = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !invalidation.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the invalidation did not return in 60 s"
        );
        let ping = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        assert!(
            matches!(ping, Ok(Ok(_))),
            "Redis did not answer a PING within 1 s during the invalidation"
        );
        pings += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    invalidation.await.unwrap();
    assert!(pings > 0, "no PING was sent while the invalidation ran");
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        slow.is_empty(),
        "Redis ran commands of 250 ms or more during the invalidation: {slow:?}"
    );
    let sample: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&["big:assets:0", "big:assets:99999", "big:assets:199999"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        sample,
        vec![None, None, None],
        "keys survived the invalidation"
    );
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert!(
        size < 100,
        "{size} keys left after the namespace was invalidated"
    );
    for i in 0..10 {
        load(format!("e{i}")).await;
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        20,
        "the engine's keys were not invalidated"
    );
}

/// A tag set of the former kind (a plain set, as the previous version wrote it) is retired
/// the first time a key enters its tag, and the next invalidation of the tag still deletes
/// the values it lists.
#[tokio::test]
async fn a_plain_tag_set_from_the_previous_version_is_still_invalidated() {
    let server = RedisServer::start().await;
    let engine = redis_engine(&server, "up:");
    let mut conn = raw_redis(&server).await;
    let () = redis::cmd("SET")
        .arg("up:assets:old")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("SADD")
        .arg("up:tag:producer:1")
        .arg("up:assets:old")
        .query_async(&mut conn)
        .await
        .map(|_: i64| ())
        .unwrap();
    let tags = ["producer:1".to_string()];
    engine
        .get_or_load("assets", "new", &tags, || async {
            Ok::<_, std::convert::Infallible>(Some(1))
        })
        .await
        .unwrap();
    let kind: String = redis::cmd("TYPE")
        .arg("up:tag:producer:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        kind, "zset",
        "the tag's set was not replaced by a sorted one"
    );

    engine.invalidate_tag("producer:1").await;
    let left: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&["up:assets:old", "up:assets:new"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        left,
        vec![None, None],
        "a value of the tag survived its invalidation"
    );
}

/// `CACHE_MEMORY_BYTES=0` (through `EngineOptions::configured`) turns the in-process tier
/// off: every read of a cached key is answered by Redis, while an engine with the default
/// bound beside it, on the same Redis, comes to answer from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_memory_bytes_zero_keeps_every_read_on_the_shared_tier() {
    let server = RedisServer::start().await;
    let engine = |bytes: u64| {
        let config = CacheConfig {
            memory_bytes: bytes,
            ..config("mem:")
        };
        let options = EngineOptions::configured(&config);
        Cache::new(
            config,
            Backend::Redis(support::redis(&server.url())),
            options,
        )
    };
    let (off, on) = (engine(0), engine(64 << 20));
    let read = |engine: &Cache| {
        let engine = engine.clone();
        async move {
            engine
                .get_or_load_bytes("assets", "k", &[], || async {
                    Ok::<_, std::convert::Infallible>(Some(b"v".to_vec()))
                })
                .await
                .unwrap()
                .1
        }
    };
    let mut sources = vec![read(&off).await];
    // Until the other engine trusts its in-process tier (its bus is up) and serves from it,
    // and a few reads more.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = 0;
    while after < 5 {
        assert!(
            Instant::now() < deadline,
            "the engine with the default bound never served from memory"
        );
        if read(&on).await == Source::Memory {
            after += 1;
        }
        sources.push(read(&off).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sources.iter().all(|s| *s != Source::Memory),
        "with no in-process tier: {sources:?}"
    );
    let near: u64 = off.stats().iter().map(|ns| ns.near_hits).sum();
    assert_eq!(near, 0, "near hits with no in-process tier");
}

/// A Redis at its `maxmemory` may evict a tag set (a key of its own, with a TTL) and keep
/// the values it lists: the next invalidation of that tag, or of the namespace, finds
/// nothing to delete. Such a value is not served: after the write, an instance with nothing
/// in process reads the new value, whether its lookup is the plain read (lookups of the
/// namespace lately hit) or the script (they lately missed). The eviction is played by
/// deleting the set on a real Redis (what an eviction leaves); the stale value is checked to
/// be still there, so each read below would serve it without the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_whose_tag_set_was_evicted_is_not_served_after_its_invalidation() {
    let server = RedisServer::start().await;
    let mut conn = raw_redis(&server).await;
    let version = Arc::new(AtomicUsize::new(1));
    let tags = vec!["producer:7".to_string()];
    let read = |engine: &Cache, key: &'static str| {
        let (engine, version, tags) = (engine.clone(), version.clone(), tags.clone());
        async move {
            engine
                .get_or_load("items", key, &tags, || async move {
                    Ok::<_, std::convert::Infallible>(Some(version.load(Ordering::SeqCst)))
                })
                .await
                .unwrap()
                .expect("a value")
        }
    };
    for (case, evicted) in [
        ("tag", "ev:tag:producer:7"),
        ("namespace", "ev:tag:ns:items"),
    ] {
        let writer = redis_engine(&server, "ev:");
        version.store(1, Ordering::SeqCst);
        assert_eq!(read(&writer, "k").await, 1, "{case}: the first read");
        let removed: i64 = redis::cmd("DEL")
            .arg(evicted)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(removed, 1, "{case}: {evicted} was not there to evict");
        version.store(2, Ordering::SeqCst);
        match case {
            "tag" => writer.invalidate_tag("producer:7").await,
            _ => writer.invalidate_namespace("items").await,
        }
        let left: Option<Vec<u8>> = redis::cmd("GET")
            .arg("ev:items:k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            left.is_some(),
            "{case}: the invalidation found the value without its set"
        );

        // Lookups of the namespace lately hit: the plain read first.
        let probing = redis_engine(&server, "ev:");
        assert_eq!(read(&probing, "k").await, 2, "{case}: the plain read");
        // Put the stale value back, out of its sets again, for the script's turn.
        let () = redis::cmd("DEL")
            .arg(evicted)
            .query_async(&mut conn)
            .await
            .map(|_: i64| ())
            .unwrap();
        let () = redis::cmd("SET")
            .arg("ev:items:k")
            .arg(left.unwrap())
            .query_async(&mut conn)
            .await
            .unwrap();
        // Lookups of the namespace lately missed: the script (a cold key first).
        let scripted = redis_engine(&server, "ev:");
        read(&scripted, "cold").await;
        assert_eq!(read(&scripted, "k").await, 2, "{case}: the lookup script");
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }
}

/// `Cache::get`, which loads nothing, checks a value's namespace set as a lookup does: after
/// the set's eviction (played by deleting it, what an eviction leaves) and an invalidation of
/// the namespace, which then found nothing to delete, the value is still in Redis but not
/// served. Before, another instance reads it from Redis (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_does_not_serve_a_value_left_out_of_its_evicted_namespace_set() {
    let server = RedisServer::start().await;
    let mut conn = raw_redis(&server).await;
    let writer = redis_engine(&server, "gv:");
    writer.set("items", "k", &1u32, &[]).await.unwrap();
    let elsewhere = redis_engine(&server, "gv:");
    assert_eq!(elsewhere.get::<u32>("items", "k").await.unwrap(), Some(1));
    let removed: i64 = redis::cmd("DEL")
        .arg("gv:tag:ns:items")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the namespace's set was not there to evict");
    writer.invalidate_namespace("items").await;
    let left: Option<Vec<u8>> = redis::cmd("GET")
        .arg("gv:items:k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        left.is_some(),
        "the invalidation found the value without its set"
    );
    let fresh = redis_engine(&server, "gv:");
    assert_eq!(fresh.get::<u32>("items", "k").await.unwrap(), None);
}

/// The check above refuses nothing it should serve: a value with tags of its own, read by
/// other instances (nothing in process) through the plain read first and through the lookup
/// script, is answered by Redis and loaded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_in_each_of_its_tag_sets_is_served_from_redis_and_loaded_once() {
    let server = RedisServer::start().await;
    let loads = Arc::new(AtomicUsize::new(0));
    let tags = vec!["producer:7".to_string(), "region:eu".to_string()];
    let read = |engine: &Cache, key: &'static str| {
        let (engine, loads, tags) = (engine.clone(), loads.clone(), tags.clone());
        async move {
            let (bytes, source) = engine
                .get_or_load_bytes("items", key, &tags, || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(Some(b"v".to_vec()))
                })
                .await
                .unwrap();
            assert_eq!(bytes.as_deref(), Some(&b"v"[..]), "{key}");
            source
        }
    };
    read(&redis_engine(&server, "in:"), "k").await;
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let probing = redis_engine(&server, "in:");
    assert_eq!(read(&probing, "k").await, Source::Shared, "the plain read");
    let scripted = redis_engine(&server, "in:");
    read(&scripted, "cold").await;
    assert_eq!(
        read(&scripted, "k").await,
        Source::Shared,
        "the lookup script"
    );
    assert_eq!(
        loads.load(Ordering::SeqCst),
        2,
        "a value in its tag sets was loaded again"
    );
}
