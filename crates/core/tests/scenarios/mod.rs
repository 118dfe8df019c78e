//! Scenarios of the cache engine shared by the test binaries (`cache.rs` on one Redis, the
//! PostgreSQL tier and in memory; `cluster.rs` on a Redis Cluster): each takes the engines it
//! runs on.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cascade_core::cache::Cache;
use cascade_core::config::{CacheBackend, CacheConfig};
use cascade_testkit::PgServer;

pub fn config(prefix: &str) -> CacheConfig {
    let mut ttls = BTreeMap::new();
    ttls.insert("short".to_string(), Duration::from_millis(300));
    ttls.insert("early".to_string(), Duration::from_millis(800));
    CacheConfig {
        backend: CacheBackend::Redis,
        ttls,
        key_names: Default::default(),
        default_ttl: Duration::from_secs(60),
        cleanup_interval: Duration::from_secs(60),
        key_prefix: prefix.to_string(),
        early_refresh: ["early".to_string()].into_iter().collect(),
        speculative_loads: true,
        memory_bytes: cascade_core::config::DEFAULT_MEMORY_BYTES,
    }
}

/// A loader that counts its calls and returns `value`.
pub async fn counted(
    calls: &AtomicUsize,
    value: &str,
) -> Result<Option<String>, std::convert::Infallible> {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Some(value.to_string()))
}

/// `requests` concurrent `get_or_load` of one cold key, spread over `engines`; returns how
/// many times the loader ran.
pub async fn concurrent_cold_loads(engines: &[Cache], requests: usize) -> usize {
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let engine = engines[i % engines.len()].clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                engine
                    .get_or_load("assets", "cold", &[], || counted(&calls, "v1"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().as_deref(), Some("v1"));
    }
    calls.load(Ordering::SeqCst)
}

/// The cache-aside race: a loader reads the old row, a write commits and invalidates, then the
/// loader tries to install what it read. It must be refused.
#[derive(Clone, Copy)]
pub enum By {
    Key,
    Tag,
    Namespace,
}

/// With `plain_gets`, also checks that the racing read's lookup sent Redis no plain `GET`
/// (its namespace leans to misses: one script reads or leases).
pub async fn stale_set_is_refused(
    engine: Cache,
    other: Cache,
    by: By,
    plain_gets: Option<&mut redis::aio::MultiplexedConnection>,
) {
    let tags = vec!["producer:9".to_string()];
    let mut plain_gets = plain_gets;
    let gets_before = match plain_gets.as_deref_mut() {
        Some(conn) => Some(plain_get_calls(conn).await),
        None => None,
    };
    let refused_before: u64 = engine.stats().iter().map(|s| s.stale_sets_refused).sum();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .get_or_load("assets", "race", &tags, || async move {
                    let old = "old".to_string(); // read before the write commits
                    let _ = started_tx.send(());
                    let _ = release_rx.await;
                    Ok::<_, std::convert::Infallible>(Some(old))
                })
                .await
                .unwrap()
        })
    };
    started_rx.await.unwrap();
    if let (Some(conn), Some(before)) = (plain_gets, gets_before) {
        let gets = plain_get_calls(conn).await - before;
        assert_eq!(gets, 0, "the lookup sent a plain GET before its script");
    }
    // The write commits, then invalidates (through the other instance when there is one).
    match by {
        By::Key => other.invalidate("assets", "race").await,
        By::Tag => other.invalidate_tag("producer:9").await,
        By::Namespace => other.invalidate_namespace("assets").await,
    }
    release_tx.send(()).unwrap();
    assert_eq!(
        slow.await.unwrap().as_deref(),
        Some("old"),
        "the slow reader itself saw the old row"
    );

    for engine in [&engine, &other] {
        let cached = engine.get::<String>("assets", "race").await.unwrap();
        assert_eq!(
            cached, None,
            "the old value was installed (by {})",
            by as u8
        );
    }
    for engine in [&engine, &other] {
        let fresh = engine
            .get_or_load("assets", "race", &[], || async {
                Ok::<_, std::convert::Infallible>(Some("new".to_string()))
            })
            .await
            .unwrap();
        assert_eq!(fresh.as_deref(), Some("new"));
    }
    let refused: u64 = engine.stats().iter().map(|s| s.stale_sets_refused).sum();
    assert_eq!(refused - refused_before, 1);
}

/// `GET`s minus scripts run, from `INFO commandstats` (which counts the commands a script runs
/// too): across a lookup, the plain `GET`s it sent, as its script runs exactly one.
pub async fn plain_get_calls(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let calls = |command: &str| {
        let field = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&field))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse::<i64>().unwrap())
    };
    calls("get") - calls("evalsha")
}

pub async fn kv(pg: &PgServer) -> (Arc<tokio_postgres::Client>, String) {
    let url = pg.fresh_database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let client = pg.client(&db).await;
    client.batch_execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL); INSERT INTO kv VALUES ('hot', 0)").await.unwrap();
    (Arc::new(client), db)
}

pub async fn read_kv(
    client: &tokio_postgres::Client,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT v FROM kv WHERE k = 'hot'", &[])
        .await?
        .map(|r| r.get(0)))
}

/// A write acknowledged through A is seen by the very next read through B, hundreds of times,
/// while other tasks keep the key hot in both instances' in-process tiers.
pub async fn write_on_a_read_on_b(pg: &PgServer, a: Cache, b: Cache) {
    let (client, db) = kv(pg).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hot = Vec::new();
    for engine in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let (stop, reader) = (stop.clone(), pg.client(&db).await);
        hot.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                engine
                    .get_or_load("assets", "hot", &[], || read_kv(&reader))
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }

    for value in 1..=300i64 {
        client
            .execute("UPDATE kv SET v = $1 WHERE k = 'hot'", &[&value])
            .await
            .unwrap();
        a.invalidate("assets", "hot").await;
        let seen = b
            .get_or_load("assets", "hot", &[], || read_kv(&client))
            .await
            .unwrap();
        assert_eq!(
            seen,
            Some(value),
            "instance B served a stale value after A's acknowledged write"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for task in hot {
        task.await.unwrap();
    }
    let stats = b.stats();
    assert!(
        stats.iter().any(|s| s.near_hits > 0),
        "the hot readers should have hit the cache: {stats:?}"
    );
}

pub async fn ttl_tags_and_negative(engine: Cache) {
    let calls = AtomicUsize::new(0);
    let load = |ns: &'static str, key: &'static str, tags: Vec<String>| {
        let engine = engine.clone();
        let calls = &calls;
        async move {
            engine
                .get_or_load(ns, key, &tags, || counted(calls, key))
                .await
                .unwrap()
        }
    };

    // TTL: the `short` namespace lives 300 ms.
    load("short", "a", vec![]).await;
    load("short", "a", vec![]).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    load("short", "a", vec![]).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "expired values are loaded again"
    );

    // Tags and namespaces.
    calls.store(0, Ordering::SeqCst);
    let t = vec!["producer:1".to_string()];
    load("assets", "x", t.clone()).await;
    load("assets", "y", t.clone()).await;
    load("listings", "z", vec![]).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    engine.invalidate_tag("producer:1").await;
    load("assets", "x", t.clone()).await;
    load("assets", "y", t.clone()).await;
    load("listings", "z", vec![]).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "tagged values reload, the untagged one is a hit"
    );
    // A key with no tag of its own is not in the in-process tag index: only its namespace's
    // generation hides it.
    load("assets", "u", vec![]).await;
    load("assets", "u", vec![]).await;
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    engine.invalidate_namespace("assets").await;
    load("assets", "x", t.clone()).await;
    load("assets", "u", vec![]).await;
    load("listings", "z", vec![]).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        8,
        "the namespace reloads, tagged or not; the other namespace does not"
    );
    load("assets", "x", t.clone()).await;
    load("assets", "u", vec![]).await;
    load("assets", "y", t.clone()).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        9,
        "what the namespace loaded since is a hit; what it held before reloads"
    );

    // Batches: several tags, or several keys, in one call each.
    calls.store(0, Ordering::SeqCst);
    let tagged = |t: &str| vec![format!("batch:{t}")];
    load("assets", "ba", tagged("a")).await;
    load("assets", "bb", tagged("b")).await;
    load("assets", "bc", tagged("c")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    engine
        .invalidate_tags(&["batch:a".to_string(), "batch:b".to_string()])
        .await;
    for (key, tag) in [("ba", "a"), ("bb", "b"), ("bc", "c")] {
        load("assets", key, tagged(tag)).await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "values of either tag reload, the third is a hit"
    );
    engine.invalidate_keys("assets", &["bb", "bc"]).await;
    for (key, tag) in [("ba", "a"), ("bb", "b"), ("bc", "c")] {
        load("assets", key, tagged(tag)).await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        7,
        "both keys reload, the other is a hit"
    );

    // Negative caching: a not-found is remembered briefly.
    let misses = AtomicUsize::new(0);
    let absent = || async {
        misses.fetch_add(1, Ordering::SeqCst);
        Ok::<Option<String>, std::convert::Infallible>(None)
    };
    assert_eq!(
        engine
            .get_or_load("assets", "missing", &[], absent)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        engine
            .get_or_load("assets", "missing", &[], absent)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        misses.load(Ordering::SeqCst),
        1,
        "the second lookup hit the negative entry"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    engine
        .get_or_load("assets", "missing", &[], absent)
        .await
        .unwrap();
    assert_eq!(
        misses.load(Ordering::SeqCst),
        2,
        "negative entries expire quickly"
    );

    // An explicit set replaces the value.
    engine
        .set("assets", "x", &"written".to_string(), &[])
        .await
        .unwrap();
    assert_eq!(
        engine
            .get::<String>("assets", "x")
            .await
            .unwrap()
            .as_deref(),
        Some("written")
    );
}

/// A lease holder whose load fails gives the lease back: a caller of another instance waiting
/// for its value gets the lease and loads (and fills) at once, instead of polling until the
/// lease's TTL and then loading without caching. `a` and `b` must wait and lease for far
/// longer than this test's bound.
pub async fn a_failed_load_gives_its_lease_back(a: Cache, b: Cache) {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        a.get_or_load_bytes("assets", "failing", &[], || async move {
            let _ = started_tx.send(());
            let _ = fail_rx.await;
            Err::<Option<Vec<u8>>, String>("the source failed".into())
        })
        .await
        .map(|_| ())
    });
    started_rx.await.expect("the first caller loads");
    let calls = Arc::new(AtomicUsize::new(0));
    let waiter = {
        let (b, calls) = (b.clone(), calls.clone());
        tokio::spawn(async move {
            b.get_or_load_bytes("assets", "failing", &[], || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Some(b"fresh".to_vec()))
            })
            .await
            .unwrap()
        })
    };
    // Let the second caller find the lease taken and start polling.
    tokio::time::sleep(Duration::from_millis(200)).await;
    fail_tx.send(()).unwrap();
    assert_eq!(holder.await.unwrap(), Err("the source failed".to_string()));
    let (value, source) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter loads once the failed load gives its lease back")
        .unwrap();
    assert_eq!(value.as_deref(), Some(&b"fresh"[..]));
    assert_eq!(source, cascade_core::cache::Source::Loaded);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // It held the lease, so its value was stored: another instance's read is a hit.
    let (again, source) = b
        .get_or_load_bytes("assets", "failing", &[], || async {
            Err::<Option<Vec<u8>>, String>("a hit must not load".into())
        })
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some(&b"fresh"[..]));
    assert_ne!(source, cascade_core::cache::Source::Loaded);
}
