//! `cascade-bench cache`: the cache engine's cost next to a raw Redis GET on the same server,
//! measured in one run, so the ratio means something on any machine. Each case runs `ops`
//! operations (the in-process mixed case ten times as many) from `concurrency` tasks on
//! 512-byte values under a key prefix of its own.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, Source};
use cascade_core::config::CacheConfig;
use cascade_core::redis::Redis;
use cascade_server::Settings;

use crate::measure::{Case, measure};

/// The namespace every case reads; its entries are removed at the end.
const NAMESPACE: &str = "bench";

pub async fn run(settings: Settings, ops: usize, concurrency: usize) -> anyhow::Result<ExitCode> {
    let config = settings.core;
    let Some(redis_config) = &config.redis else {
        eprintln!(
            "cascade-bench: cache needs REDIS_URL (bench/cache.sh starts a private redis-server for it)"
        );
        return Ok(ExitCode::from(2));
    };
    let redis = Redis::new(redis_config)?;
    anyhow::ensure!(
        redis.health().await.up,
        "Redis at {} does not answer",
        redis.display()
    );
    let concurrency = concurrency.max(1);
    let value = vec![b'x'; 512];
    let mut cache_config = config.cache.clone();
    cache_config.key_prefix = format!("bench:{}:", std::process::id());
    // The Redis tier alone (in-process tier off), and the default engine (in-process tier in
    // front of Redis, kept coherent over the bus).
    let shared = Cache::new(
        cache_config.clone(),
        Backend::Redis(redis.clone()),
        EngineOptions {
            memory_bytes: 0,
            ..EngineOptions::default()
        },
    );
    let near = Cache::new(
        cache_config.clone(),
        Backend::Redis(redis.clone()),
        EngineOptions::default(),
    );
    let raw_key = format!("{}raw", cache_config.key_prefix);
    let _: () = redis
        .query(redis::cmd("SET").arg(&raw_key).arg(&value))
        .await?;

    let cases = vec![
        raw_get(&redis, &raw_key, ops, concurrency).await,
        hit(
            "cache hit (Redis tier)",
            &shared,
            Source::Shared,
            &value,
            ops,
            concurrency,
        )
        .await,
        hit(
            "cache hit (in-process tier, coherent over the bus)",
            &near,
            Source::Memory,
            &value,
            ops,
            concurrency,
        )
        .await,
        miss(&shared, &value, ops, concurrency).await,
        mixed(&cache_config, &value, ops * MIXED_SCALE, concurrency).await,
    ];
    shared.invalidate_namespace(NAMESPACE).await;
    let _: () = redis.query(redis::cmd("DEL").arg(&raw_key)).await?;

    println!(
        "cascade-bench cache: {ops} ops per case ({} for the mixed case), {concurrency} concurrent tasks, 512-byte values, Redis {}",
        ops * MIXED_SCALE,
        redis.display()
    );
    println!();
    print_table(&cases);
    Ok(ExitCode::SUCCESS)
}

/// The baseline: a GET of a plain key, no engine.
async fn raw_get(redis: &Redis, key: &str, ops: usize, concurrency: usize) -> Case {
    let (redis, key) = (redis.clone(), key.to_string());
    measure("raw Redis GET", ops, concurrency, move |_| {
        let (redis, key) = (redis.clone(), key.clone());
        async move {
            let _: Option<Vec<u8>> = redis
                .query(redis::cmd("GET").arg(&key))
                .await
                .ok()
                .flatten();
        }
    })
    .await
}

/// Hits of one warm key, served from the tier `warm` names.
async fn hit(
    name: &'static str,
    engine: &Cache,
    warm: Source,
    value: &[u8],
    ops: usize,
    concurrency: usize,
) -> Case {
    // Warm the key; for the in-process tier, wait until the bus is heard and it is trusted.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = value.to_vec();
        let source = engine
            .get_or_load_bytes(NAMESPACE, "hot", &[], || async move {
                Ok::<_, Infallible>(Some(value))
            })
            .await
            .map(|(_, source)| source);
        if matches!(source, Ok(s) if s == warm) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let engine = engine.clone();
    measure(name, ops, concurrency, move |_| {
        let engine = engine.clone();
        async move {
            let _ = engine
                .get_or_load_bytes(NAMESPACE, "hot", &[], || async {
                    Ok::<_, Infallible>(None)
                })
                .await;
        }
    })
    .await
}

/// Every operation a key nobody has read: a miss, the loader, and the fill of the Redis tier.
async fn miss(engine: &Cache, value: &[u8], ops: usize, concurrency: usize) -> Case {
    let (engine, value) = (engine.clone(), value.to_vec());
    measure(
        "miss + load + fill (Redis tier)",
        ops,
        concurrency,
        move |i| {
            let (engine, value) = (engine.clone(), value.clone());
            async move {
                let _ = engine
                    .get_or_load_bytes(NAMESPACE, &format!("cold-{i}"), &[], || async move {
                        Ok::<_, Infallible>(Some(value))
                    })
                    .await;
            }
        },
    )
    .await
}

/// The mixed case runs this many times the other cases' operations (they are in-process).
const MIXED_SCALE: usize = 10;

/// Hot keys of the mixed case.
const MIXED_HOT: usize = 1000;

/// Reads of an in-process tier alone (no Redis, so only the tier is measured): nine in ten of
/// a warm hot set of [`MIXED_HOT`] keys (each read as often), one in ten a key nobody has
/// read, loaded at once and installed. A hit then pays whatever an install costs the other
/// keys' reads. The tier is sized so that nothing is evicted.
async fn mixed(config: &CacheConfig, value: &[u8], ops: usize, concurrency: usize) -> Case {
    let engine = Cache::new(
        config.clone(),
        Backend::Memory,
        EngineOptions {
            // Each cold key stays: ~600 bytes an entry.
            memory_bytes: (ops as u64 / 10 + MIXED_HOT as u64) * 1024 + (64 << 20),
            ..EngineOptions::default()
        },
    );
    let value: Arc<[u8]> = Arc::from(value);
    let hot: Arc<Vec<String>> = Arc::new((0..MIXED_HOT).map(|k| format!("hot-{k}")).collect());
    let load = |value: Arc<[u8]>| async move { Ok::<_, Infallible>(Some(value.to_vec())) };
    for key in hot.iter() {
        let _ = engine
            .get_or_load_bytes(NAMESPACE, key, &[], || load(value.clone()))
            .await;
    }
    measure(
        "in-process hits, one read in ten a miss (in-process tier alone)",
        ops,
        concurrency,
        move |i| {
            let (engine, value, hot) = (engine.clone(), value.clone(), hot.clone());
            async move {
                let cold;
                let key = if i % 10 == 9 {
                    cold = format!("cold-{i}");
                    &cold
                } else {
                    // The hot reads' own count, spread over the set (7919 is prime to 1000).
                    let n = i / 10 * 9 + i % 10;
                    &hot[n.wrapping_mul(7919) % MIXED_HOT]
                };
                let _ = engine
                    .get_or_load_bytes(NAMESPACE, key, &[], || load(value))
                    .await;
            }
        },
    )
    .await
}

/// The table, throughput relative to the first case (the raw GET).
fn print_table(cases: &[Case]) {
    let baseline = cases.first().map_or(1.0, |c| c.ops_per_sec);
    println!("| case | ops/s | p50 | p99 | throughput vs raw GET |");
    println!("|---|---:|---:|---:|---:|");
    for case in cases {
        println!(
            "| {} | {:.0} | {:.1} µs | {:.1} µs | {:.2}× |",
            case.name,
            case.ops_per_sec,
            case.p50.as_secs_f64() * 1e6,
            case.p99.as_secs_f64() * 1e6,
            case.ops_per_sec / baseline
        );
    }
}
