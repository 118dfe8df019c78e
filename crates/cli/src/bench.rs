//! `cascade bench cache`: the cache engine's cost, next to a raw Redis GET on the same server,
//! measured in one run. Each case runs `ops` operations from `concurrency` tasks; latency is
//! per operation, throughput over the whole case.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, Source};
use cascade_core::config::Config;
use cascade_core::redis::Redis;

/// One measured case.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) ops_per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

pub(crate) async fn measure<F, Fut>(
    name: &'static str,
    ops: usize,
    concurrency: usize,
    op: F,
) -> Case
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let per_task = ops / concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let begun = Instant::now();
                op(t * per_task + i).await;
                latencies.push(begun.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(ops);
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    all.sort();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Case {
        name,
        ops_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

pub async fn cache(config: Config, ops: usize, concurrency: usize) -> anyhow::Result<ExitCode> {
    let Some(redis_config) = &config.redis else {
        eprintln!(
            "cascade: bench cache needs REDIS_URL (bench/cache.sh starts a private redis-server for it)"
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
    // The Redis tier alone (in-process tier off), and the default engine (in-process tier
    // in front of Redis, kept coherent over the bus).
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

    let mut cases = Vec::new();
    {
        let (redis, key) = (redis.clone(), raw_key.clone());
        cases.push(
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
            .await,
        );
    }
    for (name, engine, warm) in [
        ("cache hit (Redis tier)", shared.clone(), Source::Shared),
        (
            "cache hit (in-process tier, coherent over the bus)",
            near.clone(),
            Source::Memory,
        ),
    ] {
        // Warm the key; for the in-process tier, wait until the bus is heard and it is trusted.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let value = value.clone();
            let source = engine
                .get_or_load_bytes("bench", "hot", &[], || async move {
                    Ok::<_, std::convert::Infallible>(Some(value))
                })
                .await
                .map(|(_, source)| source);
            if matches!(source, Ok(s) if s == warm) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cases.push(
            measure(name, ops, concurrency, move |_| {
                let engine = engine.clone();
                async move {
                    let _ = engine
                        .get_or_load_bytes("bench", "hot", &[], || async {
                            Ok::<_, std::convert::Infallible>(None)
                        })
                        .await;
                }
            })
            .await,
        );
    }
    {
        let (engine, value) = (shared.clone(), value.clone());
        cases.push(
            measure(
                "miss + load + fill (Redis tier)",
                ops,
                concurrency,
                move |i| {
                    let (engine, value) = (engine.clone(), value.clone());
                    async move {
                        let _ = engine
                            .get_or_load_bytes("bench", &format!("cold-{i}"), &[], || async move {
                                Ok::<_, std::convert::Infallible>(Some(value))
                            })
                            .await;
                    }
                },
            )
            .await,
        );
    }
    shared.invalidate_namespace("bench").await;
    let _: () = redis.query(redis::cmd("DEL").arg(&raw_key)).await?;

    let baseline = cases[0].ops_per_sec;
    println!(
        "cascade bench cache: {ops} ops per case, {concurrency} concurrent tasks, 512-byte values, Redis {}",
        redis.display()
    );
    println!();
    println!("| case | ops/s | p50 | p99 | throughput vs raw GET |");
    println!("|---|---:|---:|---:|---:|");
    for case in &cases {
        println!(
            "| {} | {:.0} | {:.1} µs | {:.1} µs | {:.2}× |",
            case.name,
            case.ops_per_sec,
            case.p50.as_secs_f64() * 1e6,
            case.p99.as_secs_f64() * 1e6,
            case.ops_per_sec / baseline
        );
    }
    Ok(ExitCode::SUCCESS)
}
