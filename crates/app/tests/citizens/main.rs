//! `GET /citizens/{username}` end to end: the real application in-process, real PostgreSQL
//! and Redis, and Venice played by the test kit's stand-in through the production client.

mod accounts;
mod economics;
mod investments;
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;

use support::{World, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_is_read_from_venice_once_then_from_the_cache() {
    let world = World::start(&[]).await;
    let response = world.citizen("Foscari_Banker").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("age").is_some());
    assert!(response.headers().get("warning").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["username"], "Foscari_Banker");
    assert_eq!(body["stale"], false);
    assert_eq!(body["ledger"]["citizen"]["socialClass"], "Cittadini");
    for _ in 0..5 {
        assert_eq!(world.citizen("Foscari_Banker").await.status(), 200);
    }
    assert_eq!(world.venice.ledger_calls(), 1);
    // Seed 001's key: cascade:venice:{endpoint}:{params}.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &world.redis.port().to_string(),
            "--scan",
            "--pattern",
            "*venice*",
        ])
        .output()
        .unwrap();
    let keys = String::from_utf8_lossy(&out.stdout);
    assert!(
        keys.lines()
            .any(|k| k.ends_with("venice:get-ledger:Foscari_Banker")),
        "{keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_reads_make_exactly_one_upstream_call() {
    let world = World::start(&[]).await;
    world.venice.slow_down(Duration::from_millis(300));
    let client = http();
    let url = world.url("/citizens/Italia");
    let requests = (0..1000).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let ok = statuses.iter().filter(|s| matches!(s, Ok(200))).count();
    assert_eq!(
        ok,
        1000,
        "{:?}",
        statuses.iter().find(|s| !matches!(s, Ok(200)))
    );
    assert_eq!(world.venice.ledger_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_citizen_is_a_404_cached_briefly() {
    let world = World::start(&[]).await;
    let response = world.citizen("Nobody_Here").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(world.citizen("Nobody_Here").await.status(), 404);
    assert_eq!(world.venice.ledger_calls(), 1, "the 404 is cached");
    // Briefly: once the negative entry expires (5 s), Venice is asked again and may know them.
    world.venice.set_citizen(
        "Nobody_Here",
        serde_json::json!({"citizen": {"username": "Nobody_Here"}}),
    );
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(world.citizen("Nobody_Here").await.status(), 200);
    assert_eq!(world.venice.ledger_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn venice_down_serves_the_last_good_copy_flagged_stale_then_503_past_the_bound() {
    let world = World::start(&[
        // Fresh for 1 s; last good copies served stale up to 3 s old.
        ("CACHE_TTLS_JSON", r#"{"venice": 1000}"#.to_string()),
        ("VENICE_STALE_IF_ERROR", "3s".to_string()),
        ("VENICE_RETRIES", "0".to_string()),
    ])
    .await;
    assert_eq!(world.citizen("sea_trader").await.status(), 200);
    let fetched = Instant::now();
    world.venice.fail(503);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let response = world.citizen("sea_trader").await;
    assert_eq!(response.status(), 200, "served stale within the bound");
    assert_eq!(
        response.headers()["warning"].to_str().unwrap(),
        "110 - \"Response is Stale\""
    );
    let age: u64 = response.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&age), "age {age}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["stale"], true);
    assert_eq!(body["ledger"]["citizen"]["username"], "sea_trader");
    assert!(
        world.venice.ledger_calls() >= 2,
        "a fresh copy was asked for first"
    );

    // Past the bound: 503 naming Venice, with Retry-After.
    tokio::time::sleep(Duration::from_millis(3200).saturating_sub(fetched.elapsed())).await;
    let response = world.citizen("sea_trader").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("venice"),
        "{body}"
    );

    // Venice back: fresh again.
    world.venice.recover();
    let response = world.citizen("sea_trader").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["stale"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_failures_and_closes_by_itself_after_recovery() {
    let world = World::start(&[
        ("VENICE_RETRIES", "0".to_string()),
        ("VENICE_BREAKER_THRESHOLD", "3".to_string()),
        ("VENICE_BREAKER_COOL_DOWN", "1s".to_string()),
    ])
    .await;
    world.venice.fail(500);
    for name in ["a1", "a2", "a3"] {
        assert_eq!(world.citizen(name).await.status(), 503);
    }
    assert_eq!(world.venice.ledger_calls(), 3);
    // Open: no call is made, the answer is immediate.
    for name in ["a4", "a5", "Italia"] {
        let started = Instant::now();
        let response = world.citizen(name).await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().get("retry-after").is_some());
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    assert_eq!(
        world.venice.ledger_calls(),
        3,
        "an open breaker calls nobody"
    );

    world.venice.recover();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        world.citizen("Italia").await.status(),
        200,
        "the probe closes it"
    );
    assert_eq!(world.citizen("Foscari_Banker").await.status(), 200);
    assert_eq!(world.venice.ledger_calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_venice_costs_at_most_the_request_timeout_and_trips_the_breaker() {
    let world = World::start(&[
        ("VENICE_REQUEST_TIMEOUT", "1s".to_string()),
        ("VENICE_BREAKER_THRESHOLD", "1".to_string()),
        ("VENICE_BREAKER_COOL_DOWN", "30s".to_string()),
    ])
    .await;
    world.venice.hang();
    let started = Instant::now();
    let response = world.citizen("Italia").await;
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        took < Duration::from_millis(2500),
        "bounded by the request timeout: {took:?}"
    );
    assert_eq!(
        world.venice.ledger_calls(),
        1,
        "a timeout is not retried past the bound"
    );
    // Tripped: the next request does not wait on Venice.
    let started = Instant::now();
    assert_eq!(world.citizen("sea_trader").await.status(), 503);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(world.venice.ledger_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_venice_is_a_503_and_recovers_when_it_comes_back() {
    let mut world = World::start(&[("VENICE_RETRIES", "1".to_string())]).await;
    world.venice.stop();
    let response = world.citizen("Italia").await;
    assert_eq!(response.status(), 503);
    world.venice.restart().await;
    assert_eq!(world.citizen("Italia").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usernames_are_400_json_and_never_reach_venice() {
    let world = World::start(&[]).await;
    let long = "a".repeat(10 * 1024);
    for bad in [
        "a%00b",
        "a%0Ab",
        "a%20b",
        "%C3%A9t%C3%A9",
        "-x",
        long.as_str(),
    ] {
        let response = world.citizen(bad).await;
        assert_eq!(response.status(), 400, "{bad:.40}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{bad:.40}");
    }
    assert_eq!(world.venice.ledger_calls(), 0);
}
