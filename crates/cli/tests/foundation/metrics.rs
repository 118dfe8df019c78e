//! `GET /metrics` against real PostgreSQL and Redis: strict Prometheus text whose counters
//! move by exactly the traffic sent.

use cascade_testkit::{PgServer, RedisServer};
use serde_json::json;

use crate::common::{Served, http};
use crate::prometheus::scrape;

const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A server on its own database and Redis, with a fixed secret and limits out of the way.
pub async fn serve_with_redis(pg: &PgServer, redis: &RedisServer) -> Served {
    Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        ("REDIS_URL", redis.url()),
        ("JWT_SECRET", SECRET.into()),
        ("PG_POOL_MAX", "7".into()),
        ("RATE_LIMIT_AUTH", "1000/1m".into()),
        ("RATE_LIMIT_LOGIN", "1000/1m".into()),
        ("RATE_LIMIT_API", "10000/1s".into()),
    ])
    .await
}

/// Registers `username` and returns its access token.
pub async fn register(served: &Served, username: &str) -> String {
    let response = http()
        .post(format!("{}/auth/register", served.base))
        .json(&json!({ "username": username, "password": "correct horse battery staple" }))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

/// `GET path` `n` times, each answered with `status`.
pub async fn get_n(served: &Served, path: &str, token: Option<&str>, n: usize, status: u16) {
    for _ in 0..n {
        let mut request = http().get(format!("{}{path}", served.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), status, "GET {path}");
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_move_with_traffic() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let served = serve_with_redis(&pg, &redis).await;
    let token = register(&served, "metrics-reader").await;

    let before = scrape(&served).await;
    get_n(&served, "/health", None, 7, 200).await;
    get_n(&served, "/me", Some(&token), 5, 200).await;
    get_n(&served, "/no/such/route/4711", None, 3, 404).await;
    let after = scrape(&served).await;

    let requests = "cascade_http_requests_total";
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let health = [("method", "GET"), ("route", "/health"), ("status", "200")];
    assert_eq!(delta(requests, &health), 7.0);
    let me = [("method", "GET"), ("route", "/me"), ("status", "200")];
    assert_eq!(delta(requests, &me), 5.0);
    assert_eq!(
        delta(requests, &[("route", "unmatched"), ("status", "404")]),
        3.0,
        "unknown paths share one label"
    );
    assert!(
        after
            .samples
            .iter()
            .all(|s| s.labels.get("route").is_none_or(|r| !r.contains("4711"))),
        "a raw path became a label value"
    );
    assert_eq!(
        after.one(
            "cascade_http_requests_total",
            &[("route", "/auth/register")]
        ),
        1.0
    );

    // Latency histograms: explicit buckets (not a summary), cumulative, one count per request.
    let duration = "cascade_http_request_duration_seconds";
    assert_eq!(after.types[duration], "histogram");
    assert_eq!(delta(&format!("{duration}_count"), &health), 7.0);
    let buckets: Vec<(f64, f64)> = after
        .matching(&format!("{duration}_bucket"), &health)
        .map(|s| {
            (
                s.labels["le"].parse::<f64>().unwrap_or(f64::INFINITY),
                s.value,
            )
        })
        .collect();
    let bounds: Vec<f64> = buckets.iter().map(|b| b.0).collect();
    for bound in [0.0001, 0.001, 0.5, 10.0, f64::INFINITY] {
        assert!(
            bounds.contains(&bound),
            "bucket {bound} missing: {bounds:?}"
        );
    }
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
    );
    let p50 = after.quantile(0.5, duration, &health).unwrap();
    assert!(p50 > 0.0 && p50 < 1.0, "p50 of /health: {p50}");

    // The cache: /me reads its session through the `sessions` namespace.
    let sessions = [("namespace", "sessions")];
    let hits = delta("cascade_cache_hits_total", &sessions);
    assert!(
        hits >= 4.0,
        "5 reads of one session, at most one miss: {hits} hits"
    );
    assert_eq!(
        after
            .matching("cascade_cache_hits_total", &sessions)
            .count(),
        2,
        "one series per tier"
    );
    let ratio = after.one("cascade_cache_hit_ratio", &sessions);
    let (total_hits, misses) = (
        after.sum("cascade_cache_hits_total", &sessions),
        after.sum("cascade_cache_misses_total", &sessions),
    );
    assert!((ratio - total_hits / (total_hits + misses)).abs() < 1e-9);
    assert_eq!(
        after.one("cascade_breaker_state", &[("breaker", "cache_shared_tier")]),
        0.0
    );

    // The in-process tier: its bound (CACHE_MEMORY_BYTES' default), and what it holds.
    assert_eq!(
        after.one("cascade_cache_memory_capacity_bytes", &[]),
        (64 << 20) as f64
    );
    let (entries, weighted) = (
        after.one("cascade_cache_memory_entries", &[]),
        after.one("cascade_cache_memory_weighted_bytes", &[]),
    );
    assert!(
        (entries == 0.0) == (weighted == 0.0) && weighted <= (64 << 20) as f64,
        "{entries} entries weigh {weighted} bytes"
    );
    if after.one(
        "cascade_cache_hits_total",
        &[("namespace", "sessions"), ("tier", "near")],
    ) > 0.0
    {
        assert!(entries >= 1.0, "in-process hits, but no entry");
    }

    // The pool.
    let acquired = delta("cascade_pg_pool_acquire_duration_seconds_count", &[]);
    assert!(
        acquired >= 5.0,
        "each /me reads PostgreSQL or the pool: {acquired}"
    );
    assert_eq!(after.one("cascade_pg_pool_max_size", &[]), 7.0);
    assert_eq!(after.one("cascade_pg_up", &[]), 1.0);
    let (size, idle, in_use) = (
        after.one("cascade_pg_pool_size", &[]),
        after.one("cascade_pg_pool_idle", &[]),
        after.one("cascade_pg_pool_in_use", &[]),
    );
    assert_eq!(size, idle + in_use);

    // Table statistics (read on the first scrape).
    assert!(
        after
            .matching("cascade_pg_table_size_bytes", &[("table", "auth_sessions")])
            .any(|s| s.value > 0.0),
        "auth_sessions has a size"
    );
    assert!(after.matching("cascade_pg_table_rows", &[]).count() >= 3);

    // Redis, and its memory against total system memory (the test server has no maxmemory).
    assert_eq!(after.one("cascade_redis_up", &[]), 1.0);
    assert_eq!(after.one("cascade_redis_maxmemory_bytes", &[]), 0.0);
    let used = after.one("cascade_redis_used_memory_bytes", &[]);
    let limit = after.one("cascade_redis_memory_limit_bytes", &[]);
    let memory_ratio = after.one("cascade_redis_memory_used_ratio", &[]);
    assert!(used > 0.0 && limit > used, "{used} of {limit}");
    assert!((memory_ratio - used / limit).abs() < 1e-9);

    // WebSocket series exist at zero before the first connection.
    assert_eq!(after.one("cascade_ws_connections", &[]), 0.0);
    assert_eq!(
        after.one("cascade_ws_messages_total", &[("direction", "in")]),
        0.0
    );
}

#[tokio::test]
async fn metrics_without_redis_leave_out_redis_and_still_count() {
    let pg = PgServer::start().await;
    let served = Served::start(&[("DATABASE_URL", pg.fresh_database().await)]).await;
    let before = scrape(&served).await;
    get_n(
        &served,
        "/health/db",
        Some(crate::common::ADMIN_TOKEN),
        2,
        200,
    )
    .await;
    let after = scrape(&served).await;
    let labels = [("route", "/health/db"), ("status", "200")];
    assert_eq!(
        after.sum("cascade_http_requests_total", &labels)
            - before.sum("cascade_http_requests_total", &labels),
        2.0
    );
    assert_eq!(after.matching("cascade_redis_up", &[]).count(), 0);
    assert_eq!(
        after.sum("cascade_http_requests_total", &[("route", "/metrics")]),
        1.0,
        "the first scrape is counted once it is answered"
    );
}
