//! `POST /investments` with an `Idempotency-Key`, `GET /investments`, and a space's totals:
//! one effect per key (retries, concurrent duplicates, a response lost to a dropped
//! connection), another body under a key refused, refusals writing nothing.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::support::{World, http};

const SPACE: &str = "venice-fund";

async fn invest(world: &World, token: &str, key: Option<&str>, body: &str) -> (u16, bool, String) {
    let mut request = http()
        .post(world.url("/investments"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, replayed, response.text().await.unwrap())
}

async fn count(world: &World, sql: &str) -> i64 {
    world
        .pg
        .client(&world.database)
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

async fn get_json(world: &World, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = http().get(world.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the server answers");
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn set_tier(world: &World, username: &str, tier: &str) {
    world
        .pg
        .client(&world.database)
        .await
        .execute(
            "UPDATE cascade_users SET subscription_tier = $2 WHERE username = $1",
            &[&username, &tier],
        )
        .await
        .unwrap();
}

/// The application, an account `investor` of a paid tier, and its space [`SPACE`].
async fn investor_with_a_space() -> (World, String) {
    let world = World::start(&[]).await;
    let token = world.register("investor").await;
    set_tier(&world, "investor", "architect").await;
    // Asked before the space exists: a "no such space" the create must not leave cached.
    let path = format!("/spaces/{SPACE}/investments");
    assert_eq!(get_json(&world, &path, None).await.0, 404);
    let created = http()
        .post(world.url("/spaces"))
        .bearer_auth(&token)
        .json(&json!({"space_id": SPACE, "title": "The fund"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    let (status, totals) = get_json(&world, &path, None).await;
    assert_eq!(
        (status, totals["investments"].as_i64()),
        (200, Some(0)),
        "{totals}"
    );
    (world, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_investment_happens_once_per_key() {
    let (world, token) = investor_with_a_space().await;

    let mut events = world.server.events.subscribe();
    let body = json!({"space_id": SPACE, "usd": "150.00"}).to_string();
    let (status, replayed, first) = invest(&world, &token, Some("key-1"), &body).await;
    assert_eq!(status, 201, "{first}");
    assert!(!replayed);
    let first_json: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        first_json["usd"],
        json!({"gross": "150.00", "fee": "3.75", "net": "146.25"})
    );
    assert_eq!(first_json["ducats"]["gross"], "1500.00");

    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let event = events.recv().await.expect("the bus");
            if event.kind == "investment.created" {
                return event;
            }
        }
    })
    .await
    .expect("an investment.created event");
    assert_eq!(event.channel, format!("space:{SPACE}"));
    assert_eq!(event.data["usd"]["net"], "146.25");

    // A retry: the first response, byte for byte, and no second investment.
    let (status, replayed, again) = invest(&world, &token, Some("key-1"), &body).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first);
    // The same request spelled differently is the same request.
    let same = json!({"usd": "150", "space_id": SPACE}).to_string();
    assert_eq!(invest(&world, &token, Some("key-1"), &same).await.2, first);
    // Replayed even after the caller's tier dropped to free: the investment was made.
    set_tier(&world, "investor", "observer").await;
    let (status, replayed, text) = invest(&world, &token, Some("key-1"), &body).await;
    assert_eq!((status, replayed), (201, true), "{text}");
    set_tier(&world, "investor", "architect").await;
    // Another body under the key: 422, nothing written.
    let other = json!({"space_id": SPACE, "usd": "200.00"}).to_string();
    let (status, _, text) = invest(&world, &token, Some("key-1"), &other).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("\"unprocessable\""), "{text}");
    assert_eq!(count(&world, "SELECT count(*) FROM investments").await, 1);

    // Ten at once with one key: one investment, ten identical answers.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (world_url, token) = (world.url("/investments"), token.clone());
            let body = json!({"space_id": SPACE, "ducats": "1000"}).to_string();
            tokio::spawn(async move {
                let response = http()
                    .post(world_url)
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .header("idempotency-key", "key-2")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 201);
    assert_eq!(count(&world, "SELECT count(*) FROM investments").await, 2);

    // A request whose connection is dropped right after it is sent (its client never reads an
    // answer, and the server may or may not have started it): a retry makes the investment
    // exactly once in both cases, and later retries replay it.
    let body = json!({"space_id": SPACE, "usd": "100.00"}).to_string();
    let address = world.url("").trim_start_matches("http://").to_string();
    let raw = |key: &str| {
        format!(
            "POST /investments HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {token}\r\n\
             idempotency-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    socket.write_all(raw("key-3").as_bytes()).await.unwrap();
    drop(socket);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, answer) = invest(&world, &token, Some("key-3"), &body).await;
    assert_eq!(status, 201, "{answer}");
    let (status, replayed, again) = invest(&world, &token, Some("key-3"), &body).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, answer);
    assert_eq!(count(&world, "SELECT count(*) FROM investments").await, 3);
    // The server finished and the client went away without reading the answer: the retry
    // gets that answer.
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    socket.write_all(raw("key-5").as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = "SELECT count(*) FROM app_idempotency_keys WHERE key = 'key-5' AND status = 201";
    while count(&world, done).await == 0 {
        assert!(Instant::now() < deadline, "the investment was not made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(socket);
    let (status, replayed, text) = invest(&world, &token, Some("key-5"), &body).await;
    assert_eq!((status, replayed), (201, true), "{text}");
    assert_eq!(count(&world, "SELECT count(*) FROM investments").await, 4);

    // The caller's list, newest first, two per page.
    let (status, page) = get_json(&world, "/investments?limit=2", Some(&token)).await;
    assert_eq!(status, 200, "{page}");
    let items = page["investments"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["usd"]["gross"], "100.00");
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, page) = get_json(
        &world,
        &format!("/investments?limit=2&cursor={cursor}"),
        Some(&token),
    )
    .await;
    assert_eq!(page["investments"].as_array().unwrap().len(), 2);
    assert_eq!(page["investments"][1]["usd"]["gross"], "150.00");
    assert_eq!(page["next_cursor"], Value::Null);

    // The space's totals, cached, and fresh after the next investment.
    let path = format!("/spaces/{SPACE}/investments");
    let (status, totals) = get_json(&world, &path, None).await;
    assert_eq!(status, 200, "{totals}");
    assert_eq!(totals["investments"], 4);
    assert_eq!(totals["usd"]["gross"], "450.00");
    let body = json!({"space_id": SPACE, "usd": "120.00"}).to_string();
    assert_eq!(invest(&world, &token, Some("key-4"), &body).await.0, 201);
    let (_, totals) = get_json(&world, &path, None).await;
    assert_eq!(totals["investments"], 5);
    assert_eq!(totals["usd"]["gross"], "570.00");
    assert_eq!(totals["usd"]["net"], "555.75");
    let (_, page) = get_json(&world, "/investments?limit=1", Some(&token)).await;
    assert_eq!(
        page["investments"][0]["usd"]["gross"], "120.00",
        "the caller's first page is fresh"
    );
    assert_eq!(
        get_json(&world, "/spaces/no-such-space/investments", None)
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_investments_write_nothing() {
    let (world, token) = investor_with_a_space().await;
    let observer = world.register("watcher").await;

    let long_key = "k".repeat(256);
    let body = |usd: &str| json!({"space_id": SPACE, "usd": usd}).to_string();
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("no key", None, body("150.00"), 400),
        (
            "a key too long",
            Some(long_key.as_str()),
            body("150.00"),
            400,
        ),
        ("a key with a space", Some("a b"), body("150.00"), 400),
        (
            "a JSON float",
            Some("k1"),
            r#"{"space_id":"venice-fund","usd":150.0}"#.to_string(),
            400,
        ),
        ("a negative amount", Some("k2"), body("-5"), 400),
        ("not a number", Some("k3"), body("abc"), 400),
        ("three decimals", Some("k4"), body("150.005"), 400),
        (
            "both currencies",
            Some("k5"),
            r#"{"space_id":"venice-fund","usd":"150","ducats":"1500"}"#.to_string(),
            400,
        ),
        ("below the minimum", Some("k6"), body("99.99"), 422),
        (
            "below the minimum after conversion",
            Some("k7"),
            json!({"space_id": SPACE, "ducats": "999.99"}).to_string(),
            422,
        ),
        (
            "an unknown space",
            Some("k8"),
            json!({"space_id": "nowhere", "usd": "150"}).to_string(),
            404,
        ),
        (
            "a 10 KB space id",
            Some("k9"),
            json!({"space_id": "x".repeat(10_000), "usd": "150"}).to_string(),
            400,
        ),
    ];
    for (what, key, body, expected) in &cases {
        let (status, _, text) = invest(&world, &token, *key, body).await;
        assert_eq!(status, *expected, "{what}: {text}");
        assert!(text.contains("\"error\""), "{what}: {text}");
    }
    // The free tier may not invest.
    let (status, _, text) = invest(&world, &observer, Some("k10"), &body("150")).await;
    assert_eq!(status, 403, "{text}");
    // A closed space takes no investment.
    let closed = http()
        .post(world.url(&format!("/spaces/{SPACE}/close")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(closed.status().is_success(), "closing: {}", closed.status());
    let (status, _, text) = invest(&world, &token, Some("k11"), &body("150")).await;
    assert_eq!(status, 409, "{text}");
    assert_eq!(count(&world, "SELECT count(*) FROM investments").await, 0);
    assert_eq!(
        count(&world, "SELECT count(*) FROM app_idempotency_keys").await,
        0
    );
    // Anonymous: 401.
    let response = http()
        .post(world.url("/investments"))
        .header("idempotency-key", "k12")
        .json(&json!({"space_id": SPACE, "usd": "150"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}
