//! The cache engine on a real Redis Cluster (3 masters, 3 replicas: 6 `redis-server`
//! processes): the bucket hash tags spread over the masters, the cache suite's stampede,
//! stale-set, read-after-write, TTL/tag/namespace scenarios, invalidations that reach every
//! bucket, batched reads (lookups and fills grouped by bucket), and a master killed under load.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cascade_core::cache::buckets::{self, Buckets};
use cascade_core::cache::{Backend, Cache, EngineOptions, Source};
use cascade_core::config::{ClusterNodes, LoginBackoff, RateLimit, RedisConfig, Secret};
use cascade_core::identity::{RateLimiter, Username};
use cascade_core::redis::{Redis, ShardEvent, ShardedSubscription};
use cascade_testkit::{PgServer, RedisCluster};

mod scenarios;

use scenarios::*;

fn cluster_redis(cluster: &RedisCluster) -> Redis {
    let urls = cluster.urls();
    Redis::new(&RedisConfig {
        url: Secret::new(urls[0].clone()),
        display: format!("cluster via {}", urls.join(",")),
        timeout: Duration::from_millis(250),
        ca_cert: None,
        sentinel: None,
        cluster: Some(ClusterNodes {
            display: urls.join(","),
            urls: urls.into_iter().map(Secret::new).collect(),
        }),
    })
    .unwrap()
}

/// An engine on the cluster; `memory`: with its in-process tier (else every read asks Redis).
fn cluster_engine(cluster: &RedisCluster, prefix: &str, memory: bool) -> Cache {
    Cache::new(
        config(prefix),
        Backend::Redis(cluster_redis(cluster)),
        cluster_options(memory),
    )
}

/// The options of [`cluster_engine`].
fn cluster_options(memory: bool) -> EngineOptions {
    let mut options = EngineOptions {
        negative_ttl: Duration::from_millis(300),
        breaker_cool_down: Duration::from_millis(200),
        ..EngineOptions::default()
    };
    if !memory {
        options.memory_bytes = 0;
    }
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_suite_passes_on_a_redis_cluster() {
    let pg = PgServer::start().await;
    let cluster = RedisCluster::start(3, 1).await;

    // The buckets' tags land where our CRC16 says, and each master serves 5 or 6 of the 16.
    let mut per_master: BTreeMap<u16, usize> = BTreeMap::new();
    for tag in Buckets::new().tags() {
        let slot = cluster.slot_of(tag);
        assert_eq!(slot, buckets::slot(tag.as_bytes()), "{tag}");
        *per_master
            .entry(cluster.master_of_slot(slot).unwrap())
            .or_default() += 1;
    }
    let counts: Vec<usize> = per_master.values().copied().collect();
    assert_eq!(
        counts.len(),
        3,
        "every master serves buckets: {per_master:?}"
    );
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{per_master:?}"
    );

    // Health and memory: every master answers; the fullest master's INFO memory.
    let redis = cluster_redis(&cluster);
    assert!(redis.health().await.up);
    assert!(redis.memory().await.unwrap().used_memory > 0);

    // Stampede: 1000 concurrent requests of a cold key on two instances, one load.
    let engines = [
        cluster_engine(&cluster, "s:", true),
        cluster_engine(&cluster, "s:", true),
    ];
    assert_eq!(
        concurrent_cold_loads(&engines, 1000).await,
        1,
        "the loader ran more than once"
    );

    // The stale-set race, invalidated by key, tag and namespace.
    for (i, by) in [By::Key, By::Tag, By::Namespace].into_iter().enumerate() {
        let prefix = format!("r{i}:");
        stale_set_is_refused(
            cluster_engine(&cluster, &prefix, true),
            cluster_engine(&cluster, &prefix, true),
            by,
            None,
        )
        .await;
    }

    // A write through one instance is seen by the next read through the other.
    write_on_a_read_on_b(
        &pg,
        cluster_engine(&cluster, "x:", true),
        cluster_engine(&cluster, "x:", true),
    )
    .await;

    // TTLs, tags, namespaces, batches, negative caching.
    ttl_tags_and_negative(cluster_engine(&cluster, "t:", true)).await;

    invalidations_reach_every_bucket(
        cluster_engine(&cluster, "b:", false),
        cluster_engine(&cluster, "b:", false),
    )
    .await;

    // Reads after their lease (the namespace leans to misses after the first pass, and a
    // speculative read, which skips the lookup, would load again instead of reading Redis).
    let mut batched = cluster_options(false);
    batched.speculative_loads = false;
    batched_reads_across_buckets(Cache::new(
        config("bl:"),
        Backend::Redis(cluster_redis(&cluster)),
        batched,
    ))
    .await;

    limits_are_shared_by_the_instances(&cluster).await;
}

/// 48 concurrent batched reads of distinct keys, spread over the buckets (their lookups and
/// fills merged per bucket, since a script's keys must share a slot): each gets its own value;
/// an invalidation during their load refuses that key's fill only; read again, the others are
/// served from Redis.
async fn batched_reads_across_buckets(engine: Cache) {
    let keys: Vec<String> = (0..48).map(|i| format!("b{i}")).collect();
    let spread: BTreeSet<usize> = keys
        .iter()
        .map(|k| Buckets::new().of(&format!("assets:{k}")))
        .collect();
    assert!(spread.len() >= 8, "{spread:?}");
    let version = Arc::new(AtomicI64::new(1));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let read = |key: String| {
        let (engine, version, gate) = (engine.clone(), version.clone(), gate.clone());
        async move {
            // The row as it was when the read began: a batch loads what its leader read.
            let v = version.load(Ordering::SeqCst);
            let load = |keys: Vec<String>| async move {
                gate.acquire().await.unwrap().forget();
                let rows = keys.into_iter().map(|k| {
                    let body = format!("\"{k}-v{v}\"").into_bytes();
                    (k, body)
                });
                Ok::<_, std::convert::Infallible>(rows.collect())
            };
            let (body, from) = engine
                .get_or_load_body_batched("assets", &key, &[], load)
                .await
                .unwrap();
            (
                String::from_utf8(body.unwrap().bytes().to_vec()).unwrap(),
                from,
            )
        }
    };
    let reads: Vec<_> = keys.iter().map(|k| tokio::spawn(read(k.clone()))).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().iter().map(|s| s.misses).sum::<u64>() < keys.len() as u64 {
        assert!(Instant::now() < deadline, "the reads were not all leased");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The row of b5 changes while every load is parked (a write, then its invalidation).
    version.store(2, Ordering::SeqCst);
    engine.invalidate("assets", "b5").await;
    gate.add_permits(10_000);
    for (key, read) in keys.iter().zip(reads) {
        assert_eq!(
            read.await.unwrap(),
            (format!("\"{key}-v1\""), Source::Loaded)
        );
    }
    for key in &keys {
        let (body, from) = read(key.clone()).await;
        if key == "b5" {
            assert_eq!((body, from), ("\"b5-v2\"".to_string(), Source::Loaded));
        } else {
            assert_eq!((body, from), (format!("\"{key}-v1\""), Source::Shared));
        }
    }
    let refused: u64 = engine.stats().iter().map(|s| s.stale_sets_refused).sum();
    assert_eq!(refused, 1);
}

/// Two instances' rate limiters share one budget per key on the cluster (decided by Redis,
/// not locally), and the login backoff's scripts (two keys under `login:{user}`) run there.
async fn limits_are_shared_by_the_instances(cluster: &RedisCluster) {
    let limiter = || {
        RateLimiter::new(
            Some(cluster_redis(cluster)),
            cluster_engine(cluster, "l:", true),
            "l:",
        )
    };
    let (one, two) = (limiter(), limiter());
    let limit = RateLimit {
        count: 3,
        period: Duration::from_secs(3600),
    };
    for (i, limiter) in [&one, &two, &one].into_iter().enumerate() {
        let decision = limiter.check("api", "alice", limit).await;
        assert!(
            decision.allowed && !decision.local,
            "request {i}: {decision:?}"
        );
    }
    let denied = two.check("api", "alice", limit).await;
    assert!(!denied.allowed && !denied.local, "{denied:?}");

    let policy = LoginBackoff {
        free: 2,
        base: Duration::from_secs(10),
        cap: Duration::from_secs(60),
        forget: Duration::from_secs(3600),
    };
    let alice = Username::parse("alice").unwrap();
    // Guesses from many networks through either instance: the free ones, and the one that
    // reserved the first wait, are admitted (the same count as on one server).
    let mut admitted = 0;
    for i in 0..10 {
        let limiter = if i % 2 == 0 { &one } else { &two };
        let decision = limiter
            .login_admit(&alice, &format!("198.51.100.{i}"), policy)
            .await;
        assert!(!decision.local, "{decision:?}");
        admitted += u32::from(decision.allowed);
    }
    assert_eq!(admitted, policy.free + 1);
}

/// Keys of every bucket carry one tag: a tag (and a namespace) invalidation through one
/// instance makes every one of them load again through another that has no in-process tier
/// (each read asks Redis).
async fn invalidations_reach_every_bucket(a: Cache, b: Cache) {
    const KEYS: usize = 64;
    let spread: BTreeSet<usize> = (0..KEYS)
        .map(|i| Buckets::new().of(&format!("assets:k{i}")))
        .collect();
    assert_eq!(
        spread.len(),
        buckets::BUCKETS,
        "the keys cover every bucket"
    );
    let calls = AtomicUsize::new(0);
    let tags = vec!["spread".to_string()];
    let load_all = |engine: Cache| {
        let (calls, tags) = (&calls, tags.clone());
        async move {
            for i in 0..KEYS {
                let key = format!("k{i}");
                let value = engine
                    .get_or_load("assets", &key, &tags, || counted(calls, &key))
                    .await
                    .unwrap();
                assert_eq!(value, Some(key));
            }
            engine
                .get_or_load("listings", "other", &[], || counted(calls, "other"))
                .await
                .unwrap();
        }
    };
    load_all(a.clone()).await;
    assert_eq!(calls.load(Ordering::SeqCst), KEYS + 1);
    load_all(a.clone()).await;
    assert_eq!(calls.load(Ordering::SeqCst), KEYS + 1, "all hits");

    b.invalidate_tag("spread").await;
    load_all(a.clone()).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2 * KEYS + 1,
        "every tagged key reloads, in every bucket; the untagged one is a hit"
    );

    b.invalidate_namespace("assets").await;
    load_all(a.clone()).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3 * KEYS + 1,
        "every key of the namespace reloads; the other namespace's is a hit"
    );
}

/// Rows `k0`…`k{n-1}` of a `kv` table at 0; a client and its database name.
async fn kv_rows(pg: &PgServer, n: usize) -> (tokio_postgres::Client, String) {
    let url = pg.fresh_database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let client = pg.client(&db).await;
    client
        .batch_execute(&format!(
            "CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL); \
             INSERT INTO kv SELECT 'k' || i, 0 FROM generate_series(0, {}) i",
            n - 1
        ))
        .await
        .unwrap();
    (client, db)
}

async fn read_row(client: &tokio_postgres::Client, key: &str) -> Result<Option<i64>, String> {
    client
        .query_opt("SELECT v FROM kv WHERE k = $1", &[&key])
        .await
        .map(|row| row.map(|r| r.get(0)))
        .map_err(|e| e.to_string())
}

/// The port of a `redis://host:port` URL.
fn cluster_port(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// Counters of the load run.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    failed: AtomicU64,
    stale: AtomicU64,
    writes: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_no_read_serves_nothing_stale_and_writes_resume() {
    const KEYS: usize = 48;
    let pg = PgServer::start().await;
    let mut cluster = RedisCluster::start(3, 1).await;
    let (writer_db, db) = kv_rows(&pg, KEYS).await;
    let (a, b) = (
        cluster_engine(&cluster, "f:", true),
        cluster_engine(&cluster, "f:", true),
    );
    // The version of each key last acknowledged to a writer: a read that starts after it
    // must not return an older one.
    let acked: Arc<Vec<AtomicI64>> = Arc::new((0..KEYS).map(|_| AtomicI64::new(0)).collect());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));

    let writer = {
        let (a, acked, tally, stop) = (a.clone(), acked.clone(), tally.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k{}", i % KEYS);
                let row = writer_db
                    .query_one("UPDATE kv SET v = v + 1 WHERE k = $1 RETURNING v", &[&key])
                    .await
                    .unwrap();
                a.invalidate("assets", &key).await;
                acked[i % KEYS].fetch_max(row.get(0), Ordering::SeqCst);
                tally.writes.fetch_add(1, Ordering::Relaxed);
                i += 7;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut readers = Vec::new();
    for (n, engine) in [b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
        let (acked, tally, stop) = (acked.clone(), tally.clone(), stop.clone());
        let client = pg.client(&db).await;
        readers.push(tokio::spawn(async move {
            let mut i = n;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k{}", i % KEYS);
                let floor = acked[i % KEYS].load(Ordering::SeqCst);
                match engine
                    .get_or_load("assets", &key, &[], || read_row(&client, &key))
                    .await
                {
                    Ok(Some(v)) if v >= floor => {}
                    Ok(seen) => {
                        eprintln!("stale: {key} read {seen:?} after {floor} was acknowledged");
                        tally.stale.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        eprintln!("failed read of {key}: {err}");
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tally.reads.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::task::yield_now().await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    // The master of bucket 0's slot: a share of the keys lives there.
    let slot = buckets::slot(Buckets::new().tag(0).as_bytes());
    let old = cluster.kill_master_of(slot);
    let killed_at = Instant::now();
    let new = cluster
        .wait_for_master(slot, old, Duration::from_secs(20))
        .await;
    let promoted_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    for reader in readers {
        reader.await.unwrap();
    }
    let errors: u64 = [&a, &b]
        .iter()
        .flat_map(|e| e.stats())
        .map(|s| s.shared_errors)
        .sum();
    eprintln!(
        "reads {}, writes {}, Redis errors {errors}, replica {new} promoted after {promoted_after:?}",
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
    );
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed reads");
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0, "stale reads");
    assert!(tally.reads.load(Ordering::Relaxed) > 1000, "the run read");
    assert!(tally.writes.load(Ordering::Relaxed) > 100, "the run wrote");
    assert!(errors > 0, "the engines never felt the master go");

    // The killed master was the first seed, where both instances' buses subscribed: they
    // subscribe on another node, and the in-process tier is trusted (serves) again.
    assert_eq!(
        old,
        cluster_port(&cluster.urls()[0]),
        "the bus's node was killed"
    );
    let (reader, deadline) = (
        pg.client(&db).await,
        Instant::now() + Duration::from_secs(10),
    );
    loop {
        let (_, source) = b
            .get_or_load_bytes("assets", "k1", &[], || async {
                read_row(&reader, "k1")
                    .await
                    .map(|v| v.map(|v| v.to_string().into_bytes()))
            })
            .await
            .unwrap();
        if source == Source::Memory {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the in-process tier was never trusted again: the bus did not resubscribe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Writes to the failed master's slots succeed again: a value stored in bucket 0 through
    // one instance is read from Redis through another (no in-process tier), within a bound.
    let key = (0..)
        .map(|i| format!("w{i}"))
        .find(|k| Buckets::new().of(&format!("assets:{k}")) == 0)
        .unwrap();
    let (writer, reader) = (
        cluster_engine(&cluster, "f:", false),
        cluster_engine(&cluster, "f:", false),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        writer.set("assets", &key, &42i64, &[]).await.unwrap();
        if reader.get::<i64>("assets", &key).await.unwrap() == Some(42) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write reached bucket 0 after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `channel` to be reported lost, then subscribed again (`again`).
async fn lost_then_subscribed_again(
    subscription: &mut ShardedSubscription,
    channel: &str,
    bound: Duration,
) {
    let mut lost = false;
    let seen = events_until(subscription, bound, |event| match event {
        ShardEvent::Lost { channel: c } if c == channel => {
            lost = true;
            false
        }
        ShardEvent::Subscribed { channel: c, again } if c == channel => {
            assert!(again, "a resubscription after a loss is reported as such");
            lost
        }
        _ => false,
    })
    .await;
    assert!(lost, "{seen:?}");
}

/// Waits (at most 15 s) until `node` counts `n` sharded subscribers of `channel`.
async fn wait_for_subscribers(cluster: &RedisCluster, channel: &str, node: u16, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cluster.subscribers(channel, true).contains(&(node, n)) {
        assert!(
            Instant::now() < deadline,
            "{channel}: not {n} sharded subscribers on {node}: {:?}",
            cluster.subscribers(channel, true)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next events of `subscription` until `done` says so (or `bound` passes: a panic naming
/// what came).
async fn events_until(
    subscription: &mut ShardedSubscription,
    bound: Duration,
    mut done: impl FnMut(&ShardEvent) -> bool,
) -> Vec<ShardEvent> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(event) => {
                let last = done(&event);
                seen.push(event);
                if last {
                    return seen;
                }
            }
            Err(_) => panic!("not within {bound:?}; got {seen:?}"),
        }
    }
}

/// Sharded pub/sub on the cluster: three channels tagged by `spread_tag` are subscribed on
/// three different masters (`PUBSUB SHARDNUMSUB`), none as a classic subscription (`PUBSUB
/// NUMSUB`), and `SPUBLISH` reaches each. When a channel's slot moves to another master
/// (resharding), or its master is killed, the channel is reported lost, then subscribed
/// again (`again`: messages may have been missed) on the new owner, without help, and
/// messages flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_subscriptions_spread_over_the_masters_and_come_back_after_a_failover() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let redis = cluster_redis(&cluster);
    let channels: Vec<String> = (0..3)
        .map(|i| format!("t:shard:{i}{}", buckets::spread_tag(i, 3)))
        .collect();
    let mut subscription = redis.sharded_subscribe(channels.clone()).await.unwrap();
    // Two cache engines' bus, `sd:bus:cache` (slot 4307), on the same master as the first
    // channel (slot 2730), is sharded too.
    let bus = "sd:bus:cache";
    let _engines = [
        cluster_engine(&cluster, "sd:", true),
        cluster_engine(&cluster, "sd:", true),
    ];
    let bus_master = cluster.master_of_slot(cluster.slot_of(bus)).unwrap();
    assert_eq!(
        cluster.master_of_slot(cluster.slot_of(&channels[0])),
        Some(bus_master)
    );
    wait_for_subscribers(&cluster, bus, bus_master, 2).await;
    let classic = cluster.subscribers(bus, false);
    assert!(classic.iter().all(|(_, n)| *n == 0), "{classic:?}");
    let mut confirmed = BTreeSet::new();
    events_until(&mut subscription, Duration::from_secs(10), |event| {
        match event {
            ShardEvent::Subscribed { channel, again } => {
                assert!(!again, "{channel} confirmed twice");
                confirmed.insert(channel.clone());
            }
            other => panic!("before any subscription: {other:?}"),
        }
        confirmed.len() == channels.len()
    })
    .await;

    let masters: BTreeSet<u16> = channels
        .iter()
        .map(|channel| cluster.master_of_slot(cluster.slot_of(channel)).unwrap())
        .collect();
    assert_eq!(masters.len(), 3, "one channel per master");
    for channel in &channels {
        let master = cluster.master_of_slot(cluster.slot_of(channel)).unwrap();
        let sharded = cluster.subscribers(channel, true);
        assert!(sharded.contains(&(master, 1)), "{channel}: {sharded:?}");
        assert_eq!(
            sharded.iter().map(|(_, n)| n).sum::<i64>(),
            1,
            "{sharded:?}"
        );
        let classic = cluster.subscribers(channel, false);
        assert!(
            classic.iter().all(|(_, n)| *n == 0),
            "{channel}: {classic:?}"
        );
    }

    // SPUBLISH: each channel's one subscriber hears it.
    for channel in &channels {
        let heard: i64 = redis
            .publish(channel, format!("hello {channel}"))
            .await
            .unwrap();
        assert_eq!(heard, 1, "{channel}");
    }
    let mut messages = BTreeMap::new();
    events_until(&mut subscription, Duration::from_secs(5), |event| {
        if let ShardEvent::Message { channel, payload } = event {
            messages.insert(channel.clone(), String::from_utf8(payload.clone()).unwrap());
        }
        messages.len() == channels.len()
    })
    .await;
    for channel in &channels {
        assert_eq!(messages[channel], format!("hello {channel}"));
    }

    // Resharding: the second channel's slot moves to the third channel's master. The old
    // owner drops the subscription (`sunsubscribe`, which redis-rs forgets): lost, then
    // subscribed again on the new owner, and messages flow there.
    let second = &channels[1];
    let to = cluster
        .master_of_slot(cluster.slot_of(&channels[2]))
        .unwrap();
    cluster.move_empty_slot(cluster.slot_of(second), to);
    lost_then_subscribed_again(&mut subscription, second, Duration::from_secs(15)).await;
    wait_for_subscribers(&cluster, second, to, 1).await;
    let heard: i64 = redis.publish(second, "moved").await.unwrap();
    assert_eq!(heard, 1);
    events_until(&mut subscription, Duration::from_secs(5), |event| {
        matches!(event, ShardEvent::Message { channel, payload } if channel == second && payload == b"moved")
    })
    .await;

    // The first channel's master dies: lost, then subscribed again on its promoted replica.
    let first = &channels[0];
    let slot = cluster.slot_of(first);
    let old = cluster.kill_master_of(slot);
    lost_then_subscribed_again(&mut subscription, first, Duration::from_secs(30)).await;
    let promoted = cluster
        .wait_for_master(slot, old, Duration::from_secs(20))
        .await;
    let on_promoted = cluster.subscribers(first, true);
    assert!(on_promoted.contains(&(promoted, 1)), "{on_promoted:?}");
    // Both buses subscribed again there, by themselves.
    wait_for_subscribers(&cluster, bus, promoted, 2).await;
    // Messages flow again (the command client finds the new master by itself too).
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.publish(first, "after").await.ok() != Some(1) {
        assert!(
            Instant::now() < deadline,
            "no SPUBLISH heard after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    events_until(&mut subscription, Duration::from_secs(5), |event| {
        matches!(event, ShardEvent::Message { channel, payload } if channel == first && payload == b"after")
    })
    .await;
}
