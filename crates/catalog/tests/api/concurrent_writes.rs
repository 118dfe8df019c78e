//! Many writers at once, on two instances: their invalidations share rounds in the engine
//! (group commit), and none of them may let a read anywhere see a value it replaced, nor wait
//! longer than one write alone when Redis is gone.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::support::{Catalog, get, send};

/// As in `paused_redis.rs`: the invalidation bound (550 ms by default), the write itself, and
/// slack for a machine busy with parallel builds.
const WRITE_BOUND: Duration = Duration::from_secs(2);

/// Assets `w0`..`w{n}`, each read on both instances (cached in both tiers), and a listing page
/// showing them all, hot on both.
async fn hot_assets(catalog: &Catalog, n: usize) -> Vec<String> {
    catalog.producer("acme").await;
    let ids: Vec<String> = (0..n).map(|w| format!("w{w}")).collect();
    for id in &ids {
        catalog.asset(id, "acme", &format!("{id} 0")).await;
    }
    for server in &catalog.servers {
        for id in &ids {
            assert_eq!(get(&server.base, &format!("/listings/{id}")).await.0, 200);
        }
        assert_eq!(get(&server.base, "/listings?limit=100").await.0, 200);
    }
    ids
}

/// The name `/listings?limit=100` on `base` shows for `id`.
async fn listed_name(base: &str, id: &str) -> serde_json::Value {
    let (_, page) = get(base, "/listings?limit=100").await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["versionId"] == id)
        .map(|item| item["name"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_two_instances_are_each_seen_by_the_next_read_on_the_other() {
    let catalog = Catalog::start(2).await;
    let ids = hot_assets(&catalog, 24).await;
    let bases: Vec<String> = catalog.servers.iter().map(|s| s.base.clone()).collect();

    let writers: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(w, id)| {
            let bases = bases.clone();
            tokio::spawn(async move {
                for round in 1..=5 {
                    let (writer, other) = (&bases[(w + round) % 2], &bases[(w + round + 1) % 2]);
                    let name = format!("{id} {round}");
                    let path = format!("/listings/{id}");
                    let (status, body) =
                        send(writer, Method::PATCH, &path, Some(json!({ "name": name }))).await;
                    assert_eq!(status, 200, "{body}");
                    for base in [other, writer] {
                        let (_, asset) = get(base, &path).await;
                        assert_eq!(asset["name"], name, "{base}: {id} after round {round}");
                        assert_eq!(
                            listed_name(base, &id).await,
                            name,
                            "{base}: the listing page showed {id}'s old name"
                        );
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_concurrent_writes_answer_within_the_bound_and_none_is_stale_after() {
    let mut catalog = Catalog::start(2).await;
    let ids = hot_assets(&catalog, 16).await;
    let bases: Vec<String> = catalog.servers.iter().map(|s| s.base.clone()).collect();

    catalog.redis.kill();
    let writers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(w, id)| {
            let (bases, id) = (bases.clone(), id.clone());
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                for round in 1..=3 {
                    let (writer, other) = (&bases[(w + round) % 2], &bases[(w + round + 1) % 2]);
                    let name = format!("{id} {round}");
                    let path = format!("/listings/{id}");
                    let started = Instant::now();
                    let (status, body) =
                        send(writer, Method::PATCH, &path, Some(json!({ "name": name }))).await;
                    let took = started.elapsed();
                    slowest = slowest.max(took);
                    assert_eq!(status, 200, "{body}");
                    assert!(
                        took < WRITE_BOUND,
                        "PATCH {id} took {took:?} with Redis down (bound {WRITE_BOUND:?})"
                    );
                    let (_, seen) = get(other, &path).await;
                    assert_eq!(seen["name"], name, "{other} served a stale value");
                }
                slowest
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for writer in writers {
        slowest = slowest.max(writer.await.unwrap());
    }
    eprintln!("slowest of 48 concurrent PATCHes with Redis down: {slowest:?}");

    catalog.redis.restart().await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for base in &bases {
            for id in &ids {
                let (status, body) = get(base, &format!("/listings/{id}")).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(
                    body["name"],
                    format!("{id} 3"),
                    "{base} served a stale value"
                );
            }
            for id in &ids[..3] {
                assert_eq!(listed_name(base, id).await, format!("{id} 3"), "{base}");
            }
        }
    }
}
