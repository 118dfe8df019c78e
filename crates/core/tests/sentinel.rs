//! Redis Sentinel against real servers: a primary, its replica and three sentinels (test kit).
//! Cascade finds the master through the sentinels; when the primary is killed and the
//! sentinels promote the replica, commands succeed again by themselves, none of them waiting
//! past `REDIS_TIMEOUT` meanwhile; the cache serves every read through the failover (from
//! PostgreSQL while Redis is away), never a stale one, and its bus resubscribes on the new
//! master. Over TLS with an ACL user as well, with every server speaking only TLS.

use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, Source};
use cascade_core::config::{
    CacheBackend, CacheConfig, Config, RawConfig, RawRedis, RedisConfig, Secret, SentinelConfig,
};
use cascade_core::redis::Redis;
use cascade_testkit::{PgServer, Pki, RedisSentinels};

const TIMEOUT: Duration = Duration::from_millis(250);
/// Down after 1 s, a vote, the promotion: a few seconds; 30 s is a hang.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);
/// No call may take much longer than its deadline (a few deadlines for a cache read that
/// tries Redis, then loads from PostgreSQL, then tries to fill Redis).
const CALL_BOUND: Duration = Duration::from_secs(2);

fn sentinel_redis(group: &RedisSentinels) -> Redis {
    let urls = group.sentinel_urls();
    Redis::new(&RedisConfig {
        url: Secret::new("redis://localhost"),
        display: format!("master {} via {}", RedisSentinels::MASTER, urls.join(",")),
        timeout: TIMEOUT,
        ca_cert: None,
        sentinel: Some(SentinelConfig {
            display: urls.join(","),
            urls: urls.into_iter().map(Secret::new).collect(),
            master: RedisSentinels::MASTER.to_string(),
        }),
        cluster: None,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_promoted_replica_after_the_primary_is_killed() {
    let mut group = RedisSentinels::start().await;
    let redis = sentinel_redis(&group);
    write_before_the_kill(&group, &redis).await;
    let timeout = TIMEOUT;
    kill_and_follow(&mut group, &redis, timeout).await;
}

const TLS_USER: &str = "cascade";
const TLS_PASSWORD: &str = "s3cret-pw";
/// A TLS handshake (and an ACL `AUTH`) on every connection: more than plain text's deadline.
const TLS_TIMEOUT: Duration = Duration::from_secs(1);

/// Every process speaks only TLS with a certificate for 127.0.0.1 (the address the
/// sentinels name), signed by `pki`'s CA; the data nodes know only the ACL user.
async fn tls_group(pki: &Pki) -> RedisSentinels {
    let (cert, key) = pki.server("127.0.0.1");
    let ca = std::fs::read(pki.ca()).unwrap();
    RedisSentinels::start_tls((&cert, &key, &ca), TLS_USER, TLS_PASSWORD).await
}

/// Cascade's Redis as `cascade serve` configures it from `REDIS_SENTINEL_URLS` (rediss://),
/// `REDIS_SENTINEL_MASTER`, `REDIS_URL` (the master's user and password) and `REDIS_CA_CERT`.
fn tls_redis(group: &RedisSentinels, password: &str, ca_cert: String) -> Redis {
    let raw = RawConfig {
        redis: RawRedis {
            redis_sentinel_urls: Some(group.sentinel_urls().join(",")),
            redis_sentinel_master: Some(RedisSentinels::MASTER.to_string()),
            redis_url: Some(format!("rediss://{TLS_USER}:{password}@master")),
            redis_ca_cert: Some(ca_cert.into()),
            redis_timeout: Some(format!("{}ms", TLS_TIMEOUT.as_millis())),
            ..RawRedis::default()
        },
        ..RawConfig::default()
    };
    let config = Config::from_raw(&raw).unwrap().redis.unwrap();
    assert!(config.sentinel.is_some(), "{config:?}");
    Redis::new(&config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_as_an_acl_user_commands_reach_the_master_and_follow_a_failover() {
    let pki = Pki::new();
    let mut group = tls_group(&pki).await;
    let redis = tls_redis(&group, TLS_PASSWORD, pki.ca());
    // The servers have no plain-text port: the sentinels and the master answered over TLS.
    let whoami: String = redis.query(redis::cmd("ACL").arg("WHOAMI")).await.unwrap();
    assert_eq!(whoami, TLS_USER);
    write_before_the_kill(&group, &redis).await;
    kill_and_follow(&mut group, &redis, TLS_TIMEOUT).await;
    let whoami: String = redis.query(redis::cmd("ACL").arg("WHOAMI")).await.unwrap();
    assert_eq!(
        whoami, TLS_USER,
        "the promoted replica is not reached as the ACL user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_wrong_password_or_an_untrusted_ca_fails_naming_the_problem() {
    let pki = Pki::new();
    let group = tls_group(&pki).await;
    let ping = |redis: Redis| async move {
        redis
            .query::<String>(&redis::cmd("PING"))
            .await
            .expect_err("PING must fail")
            .to_string()
    };

    let wrong = "not-the-password";
    let err = ping(tls_redis(&group, wrong, pki.ca())).await;
    assert!(err.contains("authentication failed"), "{err}");
    assert!(
        !err.contains(wrong),
        "the password is in the message: {err}"
    );

    // The sentinels' certificate is not signed by the CA we trust.
    let err = ping(tls_redis(&group, TLS_PASSWORD, pki.other_ca())).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(
        !err.contains(TLS_PASSWORD),
        "the password is in the message: {err}"
    );
}

/// `SET before 1`, replicated; the master is the primary.
async fn write_before_the_kill(group: &RedisSentinels, redis: &Redis) {
    let _: () = redis
        .query(redis::cmd("SET").arg("before").arg("1"))
        .await
        .unwrap();
    // Replicated before the kill (replication is asynchronous).
    let acked: i64 = redis
        .query(redis::cmd("WAIT").arg(1).arg(200))
        .await
        .unwrap();
    assert_eq!(acked, 1);
    let primary = format!("127.0.0.1:{}", group.primary.port());
    assert_eq!(redis.sentinel_master(), Some(primary));
}

/// SIGKILL of the primary, then `SET after 2` until it succeeds: each attempt within a few
/// `timeout`s, the last on the promoted replica, which has the write made before the kill.
async fn kill_and_follow(group: &mut RedisSentinels, redis: &Redis, timeout: Duration) {
    let replica = format!("127.0.0.1:{}", group.replica.port());
    group.kill_primary();
    let killed = Instant::now();
    let mut failed = 0;
    let back = loop {
        let started = Instant::now();
        let result: Result<(), _> = redis.query(redis::cmd("SET").arg("after").arg("2")).await;
        assert!(
            started.elapsed() < timeout * 3,
            "a command took {:?} with REDIS_TIMEOUT {timeout:?}",
            started.elapsed()
        );
        if result.is_ok() {
            break killed.elapsed();
        }
        failed += 1;
        assert!(
            killed.elapsed() < FAILOVER_BOUND,
            "commands still fail {FAILOVER_BOUND:?} after the kill: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "sentinel failover: commands succeed again {back:?} after the primary's SIGKILL \
         ({failed} failed meanwhile, each within REDIS_TIMEOUT)"
    );
    assert!(failed > 0, "no command failed: the primary was not killed?");
    assert_eq!(redis.sentinel_master(), Some(replica));
    // Cascade found it through whichever sentinel knew first; the others follow.
    group.wait_for_promotion(Duration::from_secs(10)).await;
    let before: Option<String> = redis.query(redis::cmd("GET").arg("before")).await.unwrap();
    assert_eq!(before.as_deref(), Some("1"), "the replicated write is lost");
    let after: Option<String> = redis.query(redis::cmd("GET").arg("after")).await.unwrap();
    assert_eq!(after.as_deref(), Some("2"));
}

/// `SENTINEL FAILOVER` leaves the old primary running, a master until the sentinels demote
/// it seconds later: Cascade must move on the sentinels' announcement, not on a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_leaves_the_old_primary_running_is_followed_at_once() {
    let group = RedisSentinels::start().await;
    let redis = sentinel_redis(&group);
    let _: () = redis
        .query(redis::cmd("SET").arg("k").arg("0"))
        .await
        .unwrap();
    // The announcement listener subscribes in the background.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replica = format!("127.0.0.1:{}", group.replica.port());
    group.failover();
    let started = Instant::now();
    let mut old_primary_still_master = false;
    for i in 1.. {
        assert!(
            started.elapsed() < FAILOVER_BOUND,
            "Cascade still writes to {:?} {FAILOVER_BOUND:?} after SENTINEL FAILOVER",
            redis.sentinel_master()
        );
        let written: Result<(), _> = redis.query(redis::cmd("SET").arg("k").arg(i)).await;
        if written.is_ok() && redis.sentinel_master().as_ref() == Some(&replica) {
            old_primary_still_master = group.primary_is_master();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "SENTINEL FAILOVER followed {:?} after it (old primary still a master then: \
         {old_primary_still_master})",
        started.elapsed()
    );
    assert!(
        old_primary_still_master,
        "Cascade moved only once the old primary was demoted: writes went to it meanwhile"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pubsub_connection_subscribes_on_the_promoted_replica() {
    let mut group = RedisSentinels::start().await;
    let redis = sentinel_redis(&group);
    let mut old = redis.pubsub().await.unwrap();
    old.subscribe("ch").await.unwrap();
    group.kill_primary();
    group.wait_for_promotion(FAILOVER_BOUND).await;
    // The old subscription ends with its server; the bus then opens a new one.
    let mut stream = Box::pin(old.into_on_message());
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    .expect("the subscription to the killed primary did not end");
    assert!(ended.is_none());

    let mut pubsub = redis.pubsub().await.unwrap();
    pubsub.subscribe("ch").await.unwrap();
    assert_eq!(
        redis.sentinel_master(),
        Some(format!("127.0.0.1:{}", group.replica.port()))
    );
    let mut messages = Box::pin(pubsub.into_on_message());
    let published: i64 = redis
        .query(redis::cmd("PUBLISH").arg("ch").arg("hello"))
        .await
        .unwrap();
    assert_eq!(published, 1, "nobody subscribed on the new master");
    let message = tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::StreamExt::next(&mut messages),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(message.get_payload_bytes(), b"hello");
}

fn engine(redis: Redis) -> Cache {
    // Every namespace at the default TTL.
    let config = CacheConfig {
        key_prefix: "f:".to_string(),
        backend: CacheBackend::Redis,
        default_ttl: Duration::from_secs(60),
        ttls: Default::default(),
        key_names: Default::default(),
        early_refresh: Default::default(),
        speculative_loads: true,
        memory_bytes: cascade_core::config::DEFAULT_MEMORY_BYTES,
        cleanup_interval: Duration::from_secs(60),
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

async fn read_kv(client: &tokio_postgres::Client) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT v FROM kv WHERE k = 'hot'", &[])
        .await?
        .map(|r| r.get(0)))
}

/// One read through `cache`, bounded, that must succeed; its value and where it came from.
async fn read(cache: &Cache, client: &tokio_postgres::Client) -> (Option<i64>, Source) {
    let started = Instant::now();
    let (bytes, source) = cache
        .get_or_load_bytes("assets", "hot", &[], || async {
            read_kv(client)
                .await
                .map(|v| v.map(|v| v.to_string().into_bytes()))
        })
        .await
        .expect("a read failed during the failover");
    assert!(
        started.elapsed() < CALL_BOUND,
        "a read took {:?}",
        started.elapsed()
    );
    let value = bytes.map(|b| String::from_utf8_lossy(&b).parse::<i64>().unwrap());
    (value, source)
}

/// Two instances (each its own client, as two processes would be): A writes and
/// invalidates, A and B read after every write. Through the primary's kill and the
/// promotion, every read succeeds and sees the last write; afterwards B's in-process tier
/// serves again, which it does only while it hears the bus, and A's invalidations still
/// reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_serves_every_read_through_a_failover_and_never_a_stale_one() {
    let pg = PgServer::start().await;
    let mut group = RedisSentinels::start().await;
    let url = pg.fresh_database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let writer = pg.client(&db).await;
    writer
        .batch_execute(
            "CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL); INSERT INTO kv VALUES ('hot', 0)",
        )
        .await
        .unwrap();
    let (a_reader, b_reader) = (pg.client(&db).await, pg.client(&db).await);
    let a = engine(sentinel_redis(&group));
    let b = engine(sentinel_redis(&group));

    // Warm: B's in-process tier serves once its bus is heard.
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(&b, &b_reader).await.1 != Source::Memory {
        assert!(
            Instant::now() < deadline,
            "B's in-process tier never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read(&a, &a_reader).await.0, Some(0));

    group.kill_primary();
    let killed = Instant::now();
    let mut promoted_at: Option<Duration> = None;
    let mut loaded_while_away = 0;
    let mut value = 0i64;
    let settled = loop {
        assert!(
            killed.elapsed() < FAILOVER_BOUND,
            "the cache did not serve from Redis and its in-process tier again within \
             {FAILOVER_BOUND:?} of the kill"
        );
        value += 1;
        writer
            .execute("UPDATE kv SET v = $1 WHERE k = 'hot'", &[&value])
            .await
            .unwrap();
        let started = Instant::now();
        a.invalidate("assets", "hot").await;
        assert!(
            started.elapsed() < CALL_BOUND,
            "an invalidation took {:?}",
            started.elapsed()
        );
        let mut b_memory = false;
        for _ in 0..3 {
            let (seen, source) = read(&b, &b_reader).await;
            assert_eq!(seen, Some(value), "B served a stale value ({source:?})");
            b_memory |= source == Source::Memory;
            if source == Source::Loaded && promoted_at.is_none() {
                loaded_while_away += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (seen, source) = read(&a, &a_reader).await;
        assert_eq!(seen, Some(value), "A served a stale value ({source:?})");
        if promoted_at.is_none() && group.master_port() == Some(group.replica.port()) {
            promoted_at = Some(killed.elapsed());
        }
        // Settled: promoted, and B served from its in-process tier a value written after
        // the promotion (so B hears the bus on the new master).
        if promoted_at.is_some() && b_memory {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "sentinel failover through the cache: promoted {promoted_at:?} after the kill, \
         in-process hits again after {settled:?}; {value} writes, {loaded_while_away} reads \
         loaded from PostgreSQL meanwhile, none stale"
    );
    assert!(
        loaded_while_away > 0,
        "no read fell back to PostgreSQL: was Redis ever away?"
    );
}
