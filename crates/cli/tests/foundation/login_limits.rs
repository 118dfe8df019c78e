//! The login limiter end to end: guessers are slowed, the account's owner is not locked out,
//! and the budget survives Redis going away (two instances, real servers; clients on
//! distinct 127.x addresses stand for distinct networks).

use std::time::Duration;

use cascade_testkit::{PgServer, RedisServer};
use serde_json::{Value, json};

use crate::common::Served;
use crate::identity::{attempt, client_from, register, serve};

async fn attempt_json(
    client: &reqwest::Client,
    server: &Served,
    user: &str,
    password: &str,
) -> (u16, Value) {
    let response = client
        .post(format!("{}/auth/login", server.base))
        .json(&json!({ "username": user, "password": password }))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers["retry-after"].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_spray_from_elsewhere_backs_off_while_the_owner_still_gets_in() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let db = pg.fresh_database().await;
    // 3 per pair per 30 s; 3 free failures per username, then 10 s doubling to at most 1 min.
    let limits = [
        ("RATE_LIMIT_LOGIN", "3/30s"),
        ("LOGIN_BACKOFF_MAX", "1m"),
        ("REDIS_TIMEOUT", "200ms"),
    ];
    let a = serve(&db, Some(&redis), &limits).await;
    let b = serve(&db, Some(&redis), &limits).await;
    register(&a, "tim", "tim's password").await;
    let home = client_from([127, 0, 0, 1]);
    let stranger = |i: u8| client_from([127, 0, 1, i]);

    // The owner logs in from home: the network becomes known to the username.
    assert_eq!(attempt(&home, &a, "tim", "tim's password").await.0, 200);

    // One network guessing at one account spends only its own pair's budget, across both
    // instances, even with the right password at the end.
    let guesser = client_from([127, 0, 0, 2]);
    for (i, server) in [&a, &b, &a].into_iter().enumerate() {
        let (status, headers) = attempt(&guesser, server, "tim", "guess").await;
        assert_eq!(status, 401, "guess {i}");
        assert_eq!(headers["ratelimit-limit"], "3");
    }
    let (status, headers) = attempt(&guesser, &b, "tim", "tim's password").await;
    assert_eq!(status, 429, "the pair's budget is spent");
    assert!((1..=30).contains(&retry_after(&headers)));
    // That network's other pairs are untouched.
    assert_eq!(attempt(&guesser, &b, "someone", "guess").await.0, 401);

    // The username has had its free failures. The next attempt from a new network is let
    // through (and reserves the first wait)...
    assert_eq!(attempt(&stranger(1), &b, "tim", "guess").await.0, 401);
    // ... and every other network then waits, on either instance, whatever the spelling,
    // even with the right password.
    for (i, (server, name, password)) in [
        (&a, "tim", "guess"),
        (&b, "TIM", "tim's password"),
        (&a, "Tim", "guess"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, headers) = attempt(&stranger(10 + i as u8), server, name, password).await;
        assert_eq!(status, 429, "{name} from a stranger's network");
        let wait = retry_after(&headers);
        assert!((1..=20).contains(&wait), "Retry-After {wait}");
    }
    // A Unicode look-alike of the name is no fresh budget: it is not a username at all, and
    // nothing is looked up or counted (PostgreSQL's lower() folds `İ` to `i`; Rust does not).
    let (status, body) = attempt_json(&stranger(20), &a, "t\u{130}m", "guess").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "username", "{body}");

    // The owner at home is not held back: a typo is a plain 401, the password gets in.
    assert_eq!(attempt(&home, &b, "tim", "guess").await.0, 401);
    assert_eq!(attempt(&home, &a, "tim", "tim's password").await.0, 200);
    // A success resets the username's count: strangers are admitted again.
    assert_eq!(attempt(&stranger(30), &b, "tim", "guess").await.0, 401);
}

#[tokio::test]
async fn without_redis_each_instance_limits_with_its_share_and_the_shared_budget_returns() {
    let pg = PgServer::start().await;
    let mut redis = RedisServer::start().await;
    let db = pg.fresh_database().await;
    let limits = [("RATE_LIMIT_LOGIN", "4/1m"), ("REDIS_TIMEOUT", "200ms")];
    let a = serve(&db, Some(&redis), &limits).await;
    let b = serve(&db, Some(&redis), &limits).await;
    let guesser = client_from([127, 0, 0, 4]);
    // Both instances work through Redis, and hear each other's heartbeats on the bus (every
    // 50 ms): that is how each knows its share once Redis is gone.
    for server in [&a, &b] {
        let (status, headers) =
            attempt(&client_from([127, 0, 0, 5]), server, "x-ray", "guess").await;
        assert_eq!(status, 401);
        assert_eq!(headers["ratelimit-limit"], "4");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Redis gone: each instance limits alone with half the budget (2 of 4), so together they
    // still admit about 4 per minute, and nobody is locked out for good.
    redis.kill();
    for (name, server) in [("A", &a), ("B", &b)] {
        let mut admitted = 0;
        for _ in 0..4 {
            match attempt(&guesser, server, "grace", "guess").await.0 {
                401 => admitted += 1,
                429 => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(admitted, 2, "instance {name} admits 4 / 2 live instances");
        let (status, headers) = attempt(&guesser, server, "grace", "guess").await;
        assert_eq!(status, 429);
        assert_eq!(headers["ratelimit-limit"], "2");
        let retry = retry_after(&headers);
        assert!((1..=60).contains(&retry), "local Retry-After {retry}");
    }

    // Redis back: the instances return to the one shared budget by themselves.
    redis.restart().await;
    for (n, server) in [(1u8, &a), (3u8, &b)] {
        let mut back = false;
        for i in 0..100u8 {
            let probe = client_from([127, 0, n, i]);
            let user = format!("probe{n}-{i}");
            let (status, headers) = attempt(&probe, server, &user, "guess").await;
            assert_eq!(status, 401, "probe {n}-{i}");
            if headers["ratelimit-limit"] == "4" {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            back,
            "Redis's shared limit took over again within 10 s on each instance"
        );
    }
    // The username's ceiling is shared again: 4 free failures from anywhere, on either
    // instance; the fifth is let through and reserves the wait; the sixth waits.
    for (i, server) in [&a, &b, &a, &b, &a].into_iter().enumerate() {
        let from = client_from([127, 0, 2, i as u8]);
        assert_eq!(attempt(&from, server, "ivan", "guess").await.0, 401, "{i}");
    }
    let from = client_from([127, 0, 2, 9]);
    let (status, headers) = attempt(&from, &b, "ivan", "guess").await;
    assert_eq!(status, 429, "over the username's shared ceiling");
    assert_eq!(headers["ratelimit-limit"], "4");
    assert!((1..=15).contains(&retry_after(&headers)));
}
