//! A catalog write while another instance is frozen (SIGSTOP: alive but silent on the bus)
//! waits for its acknowledgement without holding a pool connection. This needs real server
//! processes to freeze, so it lives beside the binary's other process tests.

use std::time::Duration;

use cascade_testkit::{PgServer, RedisServer};
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{Served, http};

async fn send(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let response = http()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn register(base: &str) -> String {
    let response = http()
        .post(format!("{base}/auth/register"))
        .json(&json!({"username": "publisher", "password": "correct horse battery staple"}))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_string()
}

#[tokio::test]
async fn a_write_waiting_for_a_silent_instance_holds_no_pool_connection() {
    // One connection per server, and a short wait for it.
    let settings = [
        ("PG_POOL_MIN", "1".to_string()),
        ("PG_POOL_MAX", "1".to_string()),
        ("PG_ACQUIRE_TIMEOUT", "500ms".to_string()),
    ];
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let mut env = vec![
        ("DATABASE_URL", pg.fresh_database().await),
        ("REDIS_URL", redis.url()),
        (
            "JWT_SECRET",
            "paused-instance-secret-paused-instance-secret".to_string(),
        ),
        ("RATE_LIMIT_API", "off".to_string()),
    ];
    env.extend(settings);
    let a = Served::start(&env).await;
    let b = Served::start(&env).await;
    let token = register(&a.base).await;
    for (path, body) in [
        ("/producers", json!({"producerId": "acme", "name": "Acme"})),
        (
            "/assets",
            json!({"versionId": "w", "producerId": "acme", "name": "W"}),
        ),
    ] {
        let (status, body) = send(&a.base, &token, Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {body}");
    }

    // B stops answering: each of A's invalidations now waits for B's acknowledgement until B
    // can no longer be trusting its own tier (a few hundred milliseconds each).
    b.signal("STOP");
    let base = a.base.clone();
    let write = tokio::spawn(async move {
        send(
            &base,
            &token,
            Method::PATCH,
            "/listings/w",
            Some(json!({"name": "W2"})),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Meanwhile a read that needs PostgreSQL gets A's one connection: the write gave it back
    // when it committed, before waiting on the bus.
    let (status, body) = get(&a.base, "/listings/never-cached").await;
    b.signal("CONT");
    assert_eq!(status, 404, "not a 503 for want of a connection: {body}");
    let (status, body) = write.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&b.base, "/listings/w").await.1["name"], "W2");
}
