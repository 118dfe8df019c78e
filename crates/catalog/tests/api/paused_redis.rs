//! A paused Redis (SIGSTOP: it keeps its sockets and its data, and answers nothing) costs a
//! write at most the engine's bounded invalidation wait (ARCHITECTURE.md, "The cache engine"),
//! while readers keep both instances hot; once Redis is back, no instance serves a value a
//! write replaced while it was away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::support::{Catalog, get, send};

/// What one write may take with Redis paused: the invalidation bound (one `REDIS_TIMEOUT`
/// plus the larger of `REDIS_TIMEOUT` and the bus's 300 ms trust window: 550 ms by default),
/// the write itself, and slack for a machine busy with parallel builds. Before the bound,
/// retries and per-call waits added up to more than 5 s for one write.
const WRITE_BOUND: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_paused_every_write_answers_within_the_bound_and_none_is_lost() {
    let catalog = Catalog::start(2).await;
    catalog.producer("acme").await;
    catalog.asset("weather@1", "acme", "Weather 0").await;
    let bases: Vec<String> = catalog.servers.iter().map(|s| s.base.clone()).collect();
    let path = "/listings/weather@1";

    // Two readers per instance keep the asset hot in both in-process tiers and in Redis.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = bases
        .iter()
        .chain(bases.iter())
        .map(|base| {
            let (base, stop) = (base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = get(&base, path).await;
                    assert_eq!(status, 200, "a read failed: {body}");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    catalog.redis.pause();
    let mut slowest = Duration::ZERO;
    for i in 1..=20 {
        let (writer, other) = (&bases[i % 2], &bases[(i + 1) % 2]);
        let name = format!("Weather {i}");
        let started = Instant::now();
        let (status, body) = send(writer, Method::PATCH, path, Some(json!({ "name": name }))).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(status, 200, "PATCH {i}: {body}");
        assert!(
            took < WRITE_BOUND,
            "PATCH {i} took {took:?} with Redis paused (bound {WRITE_BOUND:?})"
        );
        // Redis cannot carry the invalidation: the other instance must not be trusting an
        // in-process copy it could not hear about.
        let (_, seen) = get(other, path).await;
        assert_eq!(
            seen["name"], name,
            "the other instance served a stale value"
        );
    }
    catalog.redis.resume();
    eprintln!("slowest PATCH with Redis paused: {slowest:?}");

    // Redis comes back with the values it held before the pause: none may be served.
    let last = "Weather 20";
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for base in &bases {
            let (status, body) = get(base, path).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body["name"], last,
                "{base} served a stale value after resume"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "a reader never completed a read");
    }
}
