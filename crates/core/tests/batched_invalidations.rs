//! Concurrent invalidations share rounds (`cache/batcher.rs`): what a user of the engine must
//! still see. Every read after an invalidation returned sees the new value on every instance;
//! a load overtaken by an invalidation merged into another caller's round is refused; a
//! paused Redis costs each of many concurrent writers no more than one invalidation alone;
//! and many concurrent writers cost Redis far fewer round trips than one each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, Invalidations, Source};
use cascade_core::config::{CacheBackend, CacheConfig, RedisConfig, Secret};
use cascade_core::redis::Redis;
use cascade_testkit::RedisServer;

/// Redis's deadline in these tests.
const REDIS_TIMEOUT: Duration = Duration::from_millis(200);

fn engine(server: &RedisServer, prefix: &str) -> Cache {
    let redis = Redis::new(&RedisConfig {
        url: Secret::new(server.url()),
        display: server.url(),
        timeout: REDIS_TIMEOUT,
        ca_cert: None,
        sentinel: None,
        cluster: None,
    })
    .unwrap();
    let config = CacheConfig {
        backend: CacheBackend::Redis,
        ttls: BTreeMap::new(),
        key_names: Default::default(),
        default_ttl: Duration::from_secs(60),
        cleanup_interval: Duration::from_secs(60),
        key_prefix: prefix.to_string(),
        early_refresh: Default::default(),
        speculative_loads: true,
        memory_bytes: cascade_core::config::DEFAULT_MEMORY_BYTES,
    };
    Cache::new(
        config,
        Backend::Redis(redis),
        EngineOptions {
            breaker_cool_down: Duration::from_millis(200),
            ..EngineOptions::default()
        },
    )
}

/// Reads `key` of `assets` through `engine`; the loader answers the current `source` value.
async fn read(engine: &Cache, key: &str, source: &AtomicUsize) -> (usize, Source) {
    let (bytes, from) = engine
        .get_or_load_bytes("assets", key, &[format!("row:{key}")], || async {
            let v = source.load(Ordering::SeqCst).to_string();
            Ok::<_, std::convert::Infallible>(Some(v.into_bytes()))
        })
        .await
        .unwrap();
    let text = String::from_utf8(bytes.unwrap().to_vec()).unwrap();
    (text.parse().unwrap(), from)
}

/// Until both engines trust their in-process tiers (the bus's warm-up).
async fn until_near_hits(engines: &[&Cache], source: &AtomicUsize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for engine in engines {
        while read(engine, "warm", source).await.1 != Source::Memory {
            assert!(Instant::now() < deadline, "no in-process hits within 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// 64 writers, each its own keys, on two instances: every write (a key, a tag and a whole
/// namespace in one call) followed by a read on the other instance sees what it wrote, while
/// the keys stay hot in both in-process tiers; and the writes cost Redis far fewer scripts and
/// bus messages than one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_two_instances_are_each_seen_by_the_next_read_on_the_other() {
    let server = RedisServer::start().await;
    let (a, b) = (engine(&server, "g:"), engine(&server, "g:"));
    let warm = AtomicUsize::new(0);
    until_near_hits(&[&a, &b], &warm).await;
    let (writers, rounds) = (64usize, 8usize);
    let sources: Arc<Vec<AtomicUsize>> = Arc::new((0..writers).map(|_| 0.into()).collect());
    let (scripts_before, publishes_before) = (
        server.command_calls("evalsha").await,
        server.command_calls("publish").await,
    );

    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (a, b, sources) = (a.clone(), b.clone(), sources.clone());
            tokio::spawn(async move {
                let key = format!("w{w}");
                let source = &sources[w];
                for round in 1..=rounds {
                    let (writer, other) = if (w + round) % 2 == 0 {
                        (&a, &b)
                    } else {
                        (&b, &a)
                    };
                    // Hot on both before the write.
                    read(other, &key, source).await;
                    read(writer, &key, source).await;
                    source.store(round, Ordering::SeqCst);
                    let mut stale = Invalidations::new();
                    stale
                        .keys("assets", &[&key])
                        .tags([format!("row:{key}")])
                        .namespace("pages");
                    writer.invalidate_batch(&stale).await;
                    for engine in [other, writer] {
                        assert_eq!(
                            read(engine, &key, source).await.0,
                            round,
                            "writer {w}, round {round}: an old value was served"
                        );
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }

    // Reads run scripts too (leases, fills), so count what writes alone would have needed.
    let writes = (writers * rounds) as u64;
    let scripts = server.command_calls("evalsha").await - scripts_before;
    let publishes = server.command_calls("publish").await - publishes_before;
    eprintln!(
        "{writes} writes: {scripts} scripts, {publishes} publishes (heartbeats and acks included)"
    );
    // Alone, each write is one message and one acknowledgement from the other instance.
    assert!(
        publishes < writes,
        "{publishes} bus messages for {writes} writes: each write announced alone"
    );
}

/// A load that read the old value before a write is refused when the write's invalidation of
/// its key travels in a round merged with many other writers' invalidations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_a_merged_invalidation_of_its_key_is_refused() {
    let server = RedisServer::start().await;
    let (a, b) = (engine(&server, "m:"), engine(&server, "m:"));
    let warm = AtomicUsize::new(0);
    until_near_hits(&[&a, &b], &warm).await;
    let refused_before: u64 = a.stats().iter().map(|s| s.stale_sets_refused).sum();

    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let a = a.clone();
        tokio::spawn(async move {
            a.get_or_load("assets", "race", &[], || async move {
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
    // Many writers on B at once; the one that makes "race" stale is among them.
    let writers: Vec<_> = (0..48)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let key = if i == 24 {
                    "race".to_string()
                } else {
                    format!("other{i}")
                };
                b.invalidate_batch(Invalidations::new().keys("assets", &[&key]))
                    .await;
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    release_tx.send(()).unwrap();
    assert_eq!(slow.await.unwrap().as_deref(), Some("old"));

    for engine in [&a, &b] {
        assert_eq!(
            engine.get::<String>("assets", "race").await.unwrap(),
            None,
            "the old value was installed"
        );
    }
    for engine in [&a, &b] {
        let fresh = engine
            .get_or_load("assets", "race", &[], || async {
                Ok::<_, std::convert::Infallible>(Some("new".to_string()))
            })
            .await
            .unwrap();
        assert_eq!(fresh.as_deref(), Some("new"));
    }
    let refused: u64 = a.stats().iter().map(|s| s.stale_sets_refused).sum();
    assert_eq!(refused - refused_before, 1, "the stale fill was refused");
}

/// With Redis paused, 32 concurrent writers each return within the bound of one invalidation
/// alone (one `REDIS_TIMEOUT` plus the larger of `REDIS_TIMEOUT` and the bus's 300 ms window),
/// not that bound times the rounds queued before theirs; once Redis is back, neither instance
/// serves a value invalidated meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_paused_concurrent_writers_each_wait_no_more_than_one_write_alone() {
    let server = RedisServer::start().await;
    let (a, b) = (engine(&server, "q:"), engine(&server, "q:"));
    let writers = 32usize;
    let sources: Arc<Vec<AtomicUsize>> = Arc::new((0..writers).map(|_| 0.into()).collect());
    until_near_hits(&[&a, &b], &sources[0]).await;
    for w in 0..writers {
        for engine in [&a, &b] {
            read(engine, &format!("w{w}"), &sources[w]).await;
        }
    }

    server.pause();
    let bound = REDIS_TIMEOUT + REDIS_TIMEOUT.max(Duration::from_millis(300));
    // Slack for a machine shared with parallel builds; waiting for a queued round's timeout
    // as well would take another `bound`.
    let allowed = bound + Duration::from_millis(250);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (a, sources) = (a.clone(), sources.clone());
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                for round in 1..=3 {
                    // Staggered: writers keep arriving while rounds are in flight.
                    tokio::time::sleep(Duration::from_millis((w as u64 * 7) % 100)).await;
                    sources[w].store(round, Ordering::SeqCst);
                    let began = Instant::now();
                    a.invalidate_keys("assets", &[&format!("w{w}")]).await;
                    slowest = slowest.max(began.elapsed());
                }
                slowest
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for task in tasks {
        slowest = slowest.max(task.await.unwrap());
    }
    eprintln!(
        "slowest invalidation with Redis paused: {slowest:?} (bound {bound:?}); all in {:?}",
        started.elapsed()
    );
    assert!(
        slowest <= allowed,
        "an invalidation took {slowest:?} with Redis paused (one alone: at most {bound:?})"
    );
    server.resume();

    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for w in 0..writers {
            for engine in [&a, &b] {
                assert_eq!(
                    read(engine, &format!("w{w}"), &sources[w]).await.0,
                    3,
                    "writer {w}: a value invalidated while Redis was paused was served"
                );
            }
        }
    }
}
