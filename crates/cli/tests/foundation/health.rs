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
        .bearer_auth(crate::common::ADMIN_TOKEN)
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
        .bearer_auth(crate::common::ADMIN_TOKEN)
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

/// Sends `request` with `Accept-Encoding: gzip` and decodes the body as its
/// `Content-Encoding` says: a body labelled gzip must be gzip, and every error body JSON.
async fn send_accepting_gzip(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = request
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let encoding = response
        .headers()
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = response.bytes().await.unwrap();
    let plain = match encoding.as_deref() {
        None => bytes.to_vec(),
        Some("gzip") => {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut plain)
                .unwrap_or_else(|e| {
                    panic!(
                        "{status}: labelled gzip but is not ({e}): {}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
            plain
        }
        Some(other) => panic!("unexpected content-encoding {other}"),
    };
    let body = serde_json::from_slice(&plain).unwrap_or_else(|e| {
        panic!(
            "{status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&plain)
        )
    });
    (status, body)
}

#[tokio::test]
async fn error_bodies_are_labelled_gzip_only_when_they_are_gzip() {
    let pg = PgServer::start().await;
    let served = Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        ("BODY_LIMIT_BYTES", "1024".into()),
    ])
    .await;
    let client = crate::common::http();
    let (status, body) =
        send_accepting_gzip(client.post(format!("{}/auth/register", served.base)).json(
            &serde_json::json!({"username": "gzip-reader", "password": "gzip-reader's password"}),
        ))
        .await;
    assert_eq!(status, 201, "{body}");
    let token = body["access_token"].as_str().unwrap().to_string();

    // The body limit's 413, rebuilt as JSON.
    let (status, body) = send_accepting_gzip(
        client
            .post(format!("{}/producers", served.base))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "name": "x".repeat(4096) })),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    // Invalid UTF-8 in a path parameter, and a duplicated query parameter.
    for path in ["/listings/%FF%FE", "/bundle?versionId=a&versionId=b"] {
        let (status, body) =
            send_accepting_gzip(client.get(format!("{}{path}", served.base))).await;
        assert!((400..500).contains(&status), "{path}: {status} {body}");
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }

    // A successful body is still compressed.
    let response = client
        .get(format!("{}/health", served.base))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
}

#[tokio::test]
async fn health_db_answers_only_the_admin_token_and_health_stays_public() {
    use crate::common::{ADMIN_TOKEN, cascade, http, run_bounded};

    let pg = PgServer::start().await;
    let database = pg.fresh_database().await;
    let served = Served::start(&[("DATABASE_URL", database.clone())]).await;
    let url = format!("{}/health/db", served.base);

    for (what, token) in [
        ("no token", None),
        (
            "a wrong token",
            Some("not-the-admin-token-not-the-admin-token"),
        ),
        ("a prefix of the token", Some(&ADMIN_TOKEN[..20])),
    ] {
        let mut request = http().get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
        assert!(
            body.get("postgres").is_none() && !body.to_string().contains("pool"),
            "{what}: {body}"
        );
    }
    let response = http()
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["postgres"]["address"].is_string(), "{body}");

    // The public health check says up or down, and nothing about where or how.
    let (status, body) = served.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["postgres"], "up");
    assert!(!body.to_string().contains("address"), "{body}");

    // `cascade cache stats` sends the configured token, and says why it cannot without one.
    let dir = crate::common::empty_dir();
    let mut command = cascade(&dir);
    command
        .args(["cache", "stats", "--url", &served.base])
        .env("ADMIN_TOKEN", ADMIN_TOKEN);
    let (out, _) = run_bounded(command, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("backend memory"), "{stdout}");
    let mut command = cascade(&dir);
    command.args(["cache", "stats", "--url", &served.base]);
    let (out, _) = run_bounded(command, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ADMIN_TOKEN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without an ADMIN_TOKEN the operator endpoint is closed to everyone.
    drop(served);
    let closed = Served::start(&[("DATABASE_URL", database), ("ADMIN_TOKEN", String::new())]).await;
    let response = http()
        .get(format!("{}/health/db", closed.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    assert_eq!(closed.get_json("/health").await.0, 200);
}
