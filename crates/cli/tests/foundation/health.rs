use std::time::Duration;

use cascade_testkit::{PgServer, RedisServer};

use crate::common::Served;

#[tokio::test]
async fn health_follows_postgres_and_redis_down_and_back_without_a_restart() {
    let mut pg = PgServer::start().await;
    let mut redis = RedisServer::start().await;
    let served = Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        ("REDIS_URL", redis.url()),
        ("PG_ACQUIRE_TIMEOUT", "1s".into()),
        ("PG_CONNECT_TIMEOUT", "1s".into()),
    ])
    .await;

    let body = served
        .wait_for(
            "/health/db",
            Duration::from_secs(10),
            "healthy at start",
            |s, b| s == 200 && b["redis"]["status"] == "up",
        )
        .await;
    assert_eq!(body["postgres"]["status"], "up");
    assert!(body["postgres"]["pool"]["max_size"].as_u64().unwrap() >= 1);
    assert!(body["postgres"]["latency_ms"].is_number());
    let (status, overall) = served.get_json("/health").await;
    assert_eq!((status, overall["status"].as_str()), (200, Some("ok")));

    pg.kill();
    let body = served
        .wait_for(
            "/health/db",
            Duration::from_secs(15),
            "503 once PostgreSQL is killed",
            |s, _| s == 503,
        )
        .await;
    assert_eq!(body["postgres"]["status"], "down");
    assert!(body["postgres"]["error"].is_string());
    let (status, _) = served.get_json("/health").await;
    assert_eq!(status, 503);

    pg.restart().await;
    served
        .wait_for(
            "/health/db",
            Duration::from_secs(30),
            "200 after PostgreSQL restarts",
            |s, b| s == 200 && b["postgres"]["status"] == "up",
        )
        .await;

    redis.kill();
    let body = served
        .wait_for(
            "/health/db",
            Duration::from_secs(15),
            "Redis reported down",
            |_, b| b["redis"]["status"] == "down",
        )
        .await;
    assert_eq!(body["status"], "degraded");
    let (status, overall) = served.get_json("/health").await;
    assert_eq!(
        (status, overall["redis"].as_str()),
        (200, Some("down")),
        "Redis down is degraded, not down"
    );

    redis.restart().await;
    served
        .wait_for(
            "/health/db",
            Duration::from_secs(15),
            "Redis back up",
            |s, b| s == 200 && b["redis"]["status"] == "up",
        )
        .await;
}

#[tokio::test]
async fn errors_are_json_with_a_request_id() {
    let pg = PgServer::start().await;
    let served = Served::start(&[("DATABASE_URL", pg.fresh_database().await)]).await;
    let response = crate::common::http()
        .get(format!("{}/no/such/route", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string());

    let response = crate::common::http()
        .post(format!("{}/health", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    let (_, body) = served.get_json("/health").await;
    assert_eq!(
        body["redis"], "disabled",
        "no REDIS_URL means no Redis: {body}"
    );
    assert!(
        served.log().contains("running without Redis"),
        "{}",
        served.log()
    );
}

#[tokio::test]
async fn slow_requests_time_out_as_json_and_responses_are_compressed() {
    let pg = PgServer::start().await;
    let served = Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        ("REQUEST_TIMEOUT", "500ms".into()),
        ("PG_ACQUIRE_TIMEOUT", "1s".into()),
        ("PG_CONNECT_TIMEOUT", "1s".into()),
    ])
    .await;

    let response = crate::common::http()
        .get(format!("{}/health/db", served.base))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );

    // A paused PostgreSQL holds /health/db past the 500 ms request deadline.
    pg.pause();
    let started = std::time::Instant::now();
    let response = crate::common::http()
        .get(format!("{}/health/db", served.base))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    pg.resume();
    assert_eq!(response.status(), 504);
    assert!(
        elapsed < Duration::from_millis(1500),
        "the deadline was not enforced: {elapsed:?}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
}
