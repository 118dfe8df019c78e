//! Accounts, sessions, tokens and rate limits, end to end against real servers.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use cascade_testkit::{PgServer, RedisServer};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha512;

use crate::common::{Served, http};

const SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A server on `db` (and Redis, if any) with a fixed secret and the given extra settings.
pub(crate) async fn serve(db: &str, redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> Served {
    let mut env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", db.to_string()),
        ("JWT_SECRET", SECRET.into()),
        ("RATE_LIMIT_AUTH", "1000/1m".into()),
        ("RATE_LIMIT_LOGIN", "1000/1m".into()),
        ("RATE_LIMIT_API", "10000/1s".into()),
    ];
    if let Some(redis) = redis {
        env.push(("REDIS_URL", redis.url()));
    }
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v.to_string()));
    }
    Served::start(&env).await
}

/// Instances sharing one cache tier: Redis when given, else PostgreSQL alone (unified mode,
/// `CACHE_BACKEND=postgres`, no Redis at all). The session tests run both ways.
async fn serve_shared(db: &str, redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> Served {
    let mut settings = extra.to_vec();
    if redis.is_none() {
        settings.push(("CACHE_BACKEND", "postgres"));
    }
    serve(db, redis, &settings).await
}

pub(crate) struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(crate) async fn call(
    server: &Served,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let url = format!("{}{path}", server.base);
    let mut request = match method {
        "GET" => http().get(url),
        "POST" => http().post(url),
        "DELETE" => http().delete(url),
        other => panic!("method {other}"),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

/// Registers (201) or logs in (200) and returns the tokens.
pub(crate) async fn credentials(
    server: &Served,
    path: &str,
    username: &str,
    password: &str,
) -> Value {
    let body = json!({ "username": username, "password": password });
    let reply = call(server, "POST", path, None, Some(body)).await;
    let expected = if path == "/auth/register" { 201 } else { 200 };
    assert_eq!(reply.status, expected, "{path} {username}: {}", reply.body);
    reply.body
}

pub(crate) async fn register(server: &Served, username: &str, password: &str) -> Value {
    credentials(server, "/auth/register", username, password).await
}

pub(crate) async fn login(server: &Served, username: &str, password: &str) -> Value {
    credentials(server, "/auth/login", username, password).await
}

pub(crate) async fn refresh(server: &Served, refresh_token: &Value) -> Reply {
    let body = json!({ "refresh_token": refresh_token });
    call(server, "POST", "/auth/refresh", None, Some(body)).await
}

pub(crate) fn access(tokens: &Value) -> String {
    tokens["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

pub(crate) async fn me_status(server: &Served, token: &str) -> u16 {
    call(server, "GET", "/me", Some(token), None).await.status
}

pub(crate) async fn count(pg: &PgServer, db_url: &str, sql: &str) -> i64 {
    let db = db_url.rsplit('/').next().expect("db name");
    pg.client(db)
        .await
        .query_one(sql, &[])
        .await
        .expect(sql)
        .get(0)
}

/// `response` has `status` and the JSON error body with `code`.
async fn assert_json_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

pub(crate) fn assert_unauthorized(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 401, "{what}: {}", reply.body);
    assert_eq!(reply.body["error"]["code"], "unauthorized", "{what}");
    assert!(reply.header("www-authenticate").is_some(), "{what}");
}

#[tokio::test]
async fn accounts_tokens_and_every_kind_of_bad_token() {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let server = serve(&db, None, &[]).await;

    let alice = register(&server, "Alice", "correct horse battery").await;
    assert_eq!(alice["user"]["username"], "Alice");
    assert_eq!(alice["user"]["tier"], "observer");
    assert_eq!(alice["token_type"], "Bearer");
    assert_eq!(alice["expires_in"], 900);
    assert_eq!(alice["refresh_token"].as_str().unwrap().len(), 64);

    // Usernames are unique case-insensitively.
    let taken = call(
        &server,
        "POST",
        "/auth/register",
        None,
        Some(json!({ "username": "ALICE", "password": "another password" })),
    )
    .await;
    assert_eq!(taken.status, 409, "{}", taken.body);

    // Bad bodies: a 400 naming the field, and nothing written.
    let long = "x".repeat(10_000);
    for (body, field) in [
        (json!({ "username": "bob" }), Some("password")),
        (
            json!({ "username": "bob", "password": 12345678 }),
            Some("password"),
        ),
        (
            json!({ "username": long, "password": "long enough" }),
            Some("username"),
        ),
        (
            json!({ "username": "bob", "password": long }),
            Some("password"),
        ),
        (
            json!({ "username": "bob", "password": "short" }),
            Some("password"),
        ),
        (
            json!({ "username": "bob smith", "password": "long enough" }),
            Some("username"),
        ),
        (
            json!({ "username": "bob", "password": "long enough", "email": "nope" }),
            Some("email"),
        ),
        (
            json!({ "username": "bob", "password": "long enough", "admin": true }),
            None,
        ),
    ] {
        let reply = call(&server, "POST", "/auth/register", None, Some(body.clone())).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.body["error"]["code"], "bad_request");
        if let Some(field) = field {
            assert_eq!(
                reply.body["error"]["field"], field,
                "{body}: {}",
                reply.body
            );
        }
    }
    // Login and refresh: missing, mistyped and oversized fields are a 400 naming the field;
    // nothing is looked up, no session is opened.
    for (path, body, field) in [
        ("/auth/login", json!({ "username": "alice" }), "password"),
        (
            "/auth/login",
            json!({ "username": ["alice"], "password": "x" }),
            "username",
        ),
        (
            "/auth/login",
            json!({ "username": long, "password": "correct horse battery" }),
            "username",
        ),
        (
            "/auth/login",
            json!({ "username": "alice", "password": long }),
            "password",
        ),
        ("/auth/refresh", json!({}), "refresh_token"),
        (
            "/auth/refresh",
            json!({ "refresh_token": 7 }),
            "refresh_token",
        ),
        ("/auth/revoke", json!({}), "token"),
        // NUL bytes never reach PostgreSQL (a 500 before) or argon2.
        (
            "/auth/login",
            json!({ "username": "alice\0", "password": "correct horse battery" }),
            "username",
        ),
        (
            "/auth/login",
            json!({ "username": "alice", "password": "correct\0horse" }),
            "password",
        ),
        (
            "/auth/register",
            json!({ "username": "bob\0", "password": "long enough" }),
            "username",
        ),
        (
            "/auth/register",
            json!({ "username": "bob", "password": "long\0enough" }),
            "password",
        ),
    ] {
        let reply = call(&server, "POST", path, None, Some(body.clone())).await;
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.body);
        assert_eq!(reply.body["error"]["code"], "bad_request", "{path} {body}");
        assert_eq!(
            reply.body["error"]["field"], field,
            "{path} {body}: {}",
            reply.body
        );
    }

    // Not JSON at all, another content type, a body over the limit: each a JSON error.
    let raw = http()
        .post(format!("{}/auth/register", server.base))
        .header("content-type", "application/json")
        .body("{\"username\": \"bob\", ")
        .send()
        .await
        .unwrap();
    assert_json_error(raw, 400, "bad_request").await;
    let text = http()
        .post(format!("{}/auth/login", server.base))
        .body("username=alice")
        .send()
        .await
        .unwrap();
    assert_json_error(text, 415, "unsupported_media_type").await;
    let huge = http()
        .post(format!("{}/auth/register", server.base))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"username\": \"{}\"}}",
            "y".repeat(2 * 1024 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_json_error(huge, 413, "payload_too_large").await;
    assert_eq!(
        count(&pg, &db, "SELECT count(*) FROM cascade_users").await,
        1,
        "only Alice was written"
    );
    assert_eq!(
        count(&pg, &db, "SELECT count(*) FROM auth_sessions").await,
        1,
        "only Alice's registration opened a session"
    );
    assert_eq!(
        count(&pg, &db, "SELECT count(*) FROM auth_refresh_tokens").await,
        1,
        "only Alice's registration issued a refresh token"
    );

    // One message for a wrong password and an unknown user.
    let wrong = call(
        &server,
        "POST",
        "/auth/login",
        None,
        Some(json!({ "username": "alice", "password": "wrong password" })),
    )
    .await;
    let unknown = call(
        &server,
        "POST",
        "/auth/login",
        None,
        Some(json!({ "username": "nobody", "password": "wrong password" })),
    )
    .await;
    assert_unauthorized(&wrong, "wrong password");
    assert_unauthorized(&unknown, "unknown user");
    assert_eq!(wrong.body, unknown.body);

    // Login works case-insensitively and the token opens /me.
    let tokens = login(&server, "aLiCe", "correct horse battery").await;
    let token = access(&tokens);
    let me = call(&server, "GET", "/me", Some(&token), None).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["username"], "Alice");
    assert!(me.body["user"]["last_login"].is_string());

    // No token, a malformed header, a tampered payload, alg none, another algorithm.
    assert_unauthorized(&call(&server, "GET", "/me", None, None).await, "no token");
    assert_unauthorized(
        &call(&server, "GET", "/me", Some("not.a.jwt"), None).await,
        "garbage",
    );
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("2");
    claims["tier"] = json!("architect");
    let forged_payload = B64.encode(serde_json::to_vec(&claims).unwrap());
    let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_unauthorized(
        &call(&server, "GET", "/me", Some(&tampered), None).await,
        "tampered",
    );
    let none_header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let none = format!("{none_header}.{}.", parts[1]);
    assert_unauthorized(
        &call(&server, "GET", "/me", Some(&none), None).await,
        "alg none",
    );
    // Really signed with HS512 and the server's own secret: refused for the algorithm.
    let signing_input = format!(
        "{}.{}",
        B64.encode(br#"{"alg":"HS512","typ":"JWT"}"#),
        parts[1]
    );
    let mut mac = Hmac::<Sha512>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let hs512 = format!(
        "{signing_input}.{}",
        B64.encode(mac.finalize().into_bytes())
    );
    let reply = call(&server, "GET", "/me", Some(&hs512), None).await;
    assert_unauthorized(&reply, "HS512");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("algorithm not allowed"),
        "{}",
        reply.body
    );

    // Same secret, other audience, one-second tokens: refused here for the audience, and
    // refused there once expired.
    let other = serve(
        &db,
        None,
        &[("JWT_AUDIENCE", "someone-else"), ("ACCESS_TOKEN_TTL", "1s")],
    )
    .await;
    let foreign = access(&login(&other, "alice", "correct horse battery").await);
    assert_eq!(me_status(&other, &foreign).await, 200);
    let reply = call(&server, "GET", "/me", Some(&foreign), None).await;
    assert_unauthorized(&reply, "wrong audience");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("audience")
    );
    assert_unauthorized(
        &call(&other, "GET", "/me", Some(&token), None).await,
        "wrong audience",
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = call(&other, "GET", "/me", Some(&foreign), None).await;
    assert_unauthorized(&expired, "expired");
    assert!(
        expired.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    // Alice's 15-minute token is still fine on the first server.
    assert_eq!(me_status(&server, &token).await, 200);
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_refresh_token_revokes_the_session() {
    refresh_rotation_and_reuse(None).await;
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_refresh_token_revokes_the_session_in_unified_mode() {
    refresh_rotation_and_reuse(Some("postgres")).await;
}

/// `backend`: `CACHE_BACKEND`, when not the default (no Redis: in-process).
async fn refresh_rotation_and_reuse(backend: Option<&str>) {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let mut settings = vec![("REFRESH_GRACE", "1s")];
    settings.extend(backend.map(|b| ("CACHE_BACKEND", b)));
    let server = serve(&db, None, &settings).await;
    let first = register(&server, "carol", "carol's password").await;
    let r1 = first["refresh_token"].as_str().unwrap().to_string();

    let refreshed = refresh(&server, &json!(r1)).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let r2 = refreshed.body["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(r1, r2);
    assert_eq!(refreshed.body["session_id"], first["session_id"]);
    let a2 = access(&refreshed.body);
    assert_eq!(me_status(&server, &a2).await, 200);

    // A stolen, already rotated token comes back after the grace window: the whole session
    // ends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reuse = refresh(&server, &json!(r1)).await;
    assert_unauthorized(&reuse, "reuse");
    assert!(
        reuse.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reuse")
    );
    assert_eq!(
        me_status(&server, &a2).await,
        401,
        "access tokens of the session die too"
    );
    let after = refresh(&server, &json!(r2)).await;
    assert_unauthorized(&after, "the newest refresh token of a revoked session");
    assert_eq!(
        count(
            &pg,
            &db,
            "SELECT count(*) FROM auth_sessions WHERE revoked_reason = 'refresh token reuse'"
        )
        .await,
        1
    );

    // Garbage refresh tokens are a plain 401; malformed bodies a 400.
    let bogus = refresh(&server, &json!("0".repeat(64))).await;
    assert_unauthorized(&bogus, "unknown refresh token");
    let bad = call(
        &server,
        "POST",
        "/auth/refresh",
        None,
        Some(json!({ "token": "x" })),
    )
    .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn a_refresh_retried_within_the_grace_window_gets_the_same_pair_instead_of_revoking() {
    let redis = RedisServer::start().await;
    refresh_retried_within_grace(Some(&redis)).await;
}

#[tokio::test]
async fn a_refresh_retried_within_the_grace_window_gets_the_same_pair_in_unified_mode() {
    refresh_retried_within_grace(None).await;
}

async fn refresh_retried_within_grace(redis: Option<&RedisServer>) {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    // Two instances: the retry may land on another one than the lost answer came from.
    let a = serve_shared(&db, redis, &[]).await;
    let b = serve_shared(&db, redis, &[]).await;
    let first = register(&a, "walt", "walt's password").await;
    let r1 = first["refresh_token"].clone();

    // The answer to this rotation is lost; the client retries with the same token.
    let lost = refresh(&a, &r1).await;
    assert_eq!(lost.status, 200, "{}", lost.body);
    let retried = refresh(&b, &r1).await;
    assert_eq!(retried.status, 200, "a retry is no reuse: {}", retried.body);
    assert_eq!(retried.body["refresh_token"], lost.body["refresh_token"]);
    assert_eq!(retried.body["session_id"], first["session_id"]);
    assert_eq!(me_status(&a, &access(&retried.body)).await, 200);
    assert_eq!(me_status(&b, &access(&lost.body)).await, 200);
    assert_eq!(
        count(
            &pg,
            &db,
            "SELECT count(*) FROM auth_refresh_tokens WHERE rotated_at IS NULL"
        )
        .await,
        1,
        "one live refresh token per session"
    );

    // The successor it got is the session's live token and rotates as usual.
    let next = refresh(&b, &retried.body["refresh_token"]).await;
    assert_eq!(next.status, 200, "{}", next.body);
    // Once the successor has been used, the old token is reuse again, window or not.
    let reuse = refresh(&a, &r1).await;
    assert_unauthorized(&reuse, "reuse after the successor was used");
    assert_eq!(me_status(&b, &access(&next.body)).await, 401);
    let after = refresh(&a, &next.body["refresh_token"]).await;
    assert_unauthorized(&after, "the revoked session's newest token");
}

#[tokio::test]
async fn logout_and_revocation_on_one_instance_are_refused_on_another_at_once() {
    let redis = RedisServer::start().await;
    logout_and_revocation_across_instances(Some(&redis)).await;
}

#[tokio::test]
async fn logout_and_revocation_on_one_instance_are_refused_on_another_in_unified_mode() {
    logout_and_revocation_across_instances(None).await;
}

async fn logout_and_revocation_across_instances(redis: Option<&RedisServer>) {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let a = serve_shared(&db, redis, &[]).await;
    let b = serve_shared(&db, redis, &[]).await;
    register(&a, "dave", "dave's password").await;

    for round in 0..3 {
        let tokens = login(&a, "dave", "dave's password").await;
        let token = access(&tokens);
        // B has the session hot in its in-process tier.
        for _ in 0..20 {
            assert_eq!(me_status(&b, &token).await, 200);
        }
        let started = Instant::now();
        match round {
            0 => {
                let out = call(&a, "POST", "/auth/logout", Some(&token), None).await;
                assert_eq!(out.status, 204, "{}", out.body);
            }
            1 => {
                // RFC 7009 revocation of the access token alone: the session lives on.
                let out = call(
                    &a,
                    "POST",
                    "/auth/revoke",
                    None,
                    Some(json!({ "token": token })),
                )
                .await;
                assert_eq!(out.status, 200, "{}", out.body);
            }
            _ => {
                let session = tokens["session_id"].as_str().unwrap();
                let other = access(&login(&a, "dave", "dave's password").await);
                let out = call(
                    &a,
                    "DELETE",
                    &format!("/me/sessions/{session}"),
                    Some(&other),
                    None,
                )
                .await;
                assert_eq!(out.status, 204, "{}", out.body);
            }
        }
        // The very next request on B is refused: no polling, no waiting for a TTL.
        let reply = call(&b, "GET", "/me", Some(&token), None).await;
        assert_unauthorized(&reply, &format!("round {round} on B"));
        assert!(started.elapsed() < Duration::from_secs(5));
        if round == 1 {
            // The refresh token still works: only that access token was revoked.
            let fresh = refresh(&b, &json!(tokens["refresh_token"])).await;
            assert_eq!(fresh.status, 200, "{}", fresh.body);
            assert_eq!(me_status(&b, &access(&fresh.body)).await, 200);
        } else {
            let fresh = refresh(&b, &json!(tokens["refresh_token"])).await;
            assert_unauthorized(&fresh, "refresh after logout");
        }
    }
}

/// Polls `sql` (one number) on `db` until it is `want`, for at most 10 s.
async fn wait_for_count(pg: &PgServer, db: &str, sql: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(pg, db, sql).await != want {
        assert!(Instant::now() < deadline, "{sql} never reached {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_logout_whose_client_hangs_up_at_once_is_still_refused_on_another_instance() {
    use tokio::io::AsyncWriteExt;

    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let db = pg.fresh_database().await;
    let a = serve(&db, Some(&redis), &[]).await;
    let b = serve(&db, Some(&redis), &[]).await;
    let tokens = register(&a, "xena", "xena's password").await;
    let token = access(&tokens);
    let session = tokens["session_id"].as_str().unwrap().to_string();
    // Both instances have the session hot in their in-process tier.
    for server in [&a, &b] {
        for _ in 0..5 {
            assert_eq!(me_status(server, &token).await, 200);
        }
    }

    // Another transaction holds the session's row, so the logout is still running (its
    // UPDATE waits) when its client goes away.
    let holder = pg.client(db.rsplit('/').next().unwrap()).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM auth_sessions WHERE id = $1::text::uuid FOR UPDATE",
            &[&session],
        )
        .await
        .unwrap();
    let addr = a.base.trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /auth/logout HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    wait_for_count(
        &pg,
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE 'UPDATE auth_sessions SET revoked_at%'",
        1,
    )
    .await;
    // The client hangs up; the server notices and drops the request.
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    holder.batch_execute("ROLLBACK").await.unwrap();

    // The UPDATE had been sent, so PostgreSQL has the logout either way...
    wait_for_count(
        &pg,
        &db,
        "SELECT count(*) FROM auth_sessions WHERE revoked_at IS NOT NULL",
        1,
    )
    .await;
    // ... and the other instance must stop accepting the token (before the fix, its cached
    // copy stayed valid until the session's next sliding update).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = false;
    while Instant::now() < deadline {
        if me_status(&b, &token).await == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "instance B still accepts a logged-out token");
    assert_eq!(me_status(&a, &token).await, 401);
}

#[tokio::test]
async fn a_logout_while_redis_is_unreachable_is_refused_everywhere_and_stays_refused_when_it_returns()
 {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let db = pg.fresh_database().await;
    let settings = [("REDIS_TIMEOUT", "200ms")];
    let a = serve(&db, Some(&redis), &settings).await;
    let b = serve(&db, Some(&redis), &settings).await;
    register(&a, "judy", "judy's password").await;
    let token = access(&login(&a, "judy", "judy's password").await);
    // B has the session in its in-process tier and Redis has it too.
    for _ in 0..20 {
        assert_eq!(me_status(&b, &token).await, 200);
    }

    // Redis stops answering (paused: it keeps the old session entry), and A logs out. A
    // cannot reach Redis or the bus; PostgreSQL has the truth.
    redis.pause();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let out = call(&a, "POST", "/auth/logout", Some(&token), None).await;
    assert_eq!(out.status, 204, "{}", out.body);
    let reply = call(&b, "GET", "/me", Some(&token), None).await;
    assert_unauthorized(&reply, "B, Redis unreachable");

    // Redis answers again with the entry from before the logout: nobody may be served it.
    redis.resume();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for server in [&a, &b] {
            let reply = call(server, "GET", "/me", Some(&token), None).await;
            assert_unauthorized(&reply, "after Redis returned with the old entry");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_restart_logs_nobody_out() {
    let pg = PgServer::start().await;
    let mut redis = RedisServer::start().await;
    let db = pg.fresh_database().await;
    let server = serve(&db, Some(&redis), &[("REDIS_TIMEOUT", "200ms")]).await;
    let tokens = register(&server, "erin", "erin's password").await;
    let token = access(&tokens);
    assert_eq!(me_status(&server, &token).await, 200);

    redis.kill();
    for _ in 0..5 {
        assert_eq!(me_status(&server, &token).await, 200, "Redis down");
    }
    redis.restart().await;
    // Redis came back empty; the session is reloaded from PostgreSQL.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(
            me_status(&server, &token).await,
            200,
            "Redis back (and empty)"
        );
        let health = server.get_json("/health/db").await.1;
        if health["redis"]["status"] == "up" || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refreshed = refresh(&server, &json!(tokens["refresh_token"])).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    // And a logout still takes effect.
    let out = call(
        &server,
        "POST",
        "/auth/logout",
        Some(&access(&refreshed.body)),
        None,
    )
    .await;
    assert_eq!(out.status, 204);
    assert_eq!(me_status(&server, &access(&refreshed.body)).await, 401);
}

#[tokio::test]
async fn one_user_cannot_see_or_end_another_users_sessions() {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let server = serve(&db, None, &[]).await;
    let alice = register(&server, "alice", "alice's password").await;
    let alice_laptop = login(&server, "alice", "alice's password").await;
    let bob = register(&server, "bob", "bob's password").await;
    let (alice_token, bob_token) = (access(&alice), access(&bob));

    let listed = call(&server, "GET", "/me/sessions", Some(&alice_token), None).await;
    assert_eq!(listed.status, 200);
    let sessions = listed.body["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    let bobs = call(&server, "GET", "/me/sessions", Some(&bob_token), None).await;
    let bob_ids: Vec<&Value> = bobs.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["id"])
        .collect();
    assert_eq!(bob_ids, vec![&bob["session_id"]]);

    // Bob tries to end Alice's sessions: as if they did not exist, and they live on.
    for session in [&alice["session_id"], &alice_laptop["session_id"]] {
        let path = format!("/me/sessions/{}", session.as_str().unwrap());
        let reply = call(&server, "DELETE", &path, Some(&bob_token), None).await;
        assert_eq!(reply.status, 404, "{}", reply.body);
    }
    assert_eq!(me_status(&server, &alice_token).await, 200);
    assert_eq!(me_status(&server, &access(&alice_laptop)).await, 200);
    let reply = call(
        &server,
        "DELETE",
        "/me/sessions/not-a-uuid",
        Some(&bob_token),
        None,
    )
    .await;
    assert_eq!(reply.status, 400);
    // Bob's refresh token cannot be used to revoke Alice's session either: /me is per token.
    let me = call(&server, "GET", "/me", Some(&bob_token), None).await;
    assert_eq!(me.body["user"]["username"], "bob");

    // Alice ends her laptop session from her phone.
    let path = format!(
        "/me/sessions/{}",
        alice_laptop["session_id"].as_str().unwrap()
    );
    assert_eq!(
        call(&server, "DELETE", &path, Some(&alice_token), None)
            .await
            .status,
        204
    );
    assert_eq!(me_status(&server, &access(&alice_laptop)).await, 401);
    assert_eq!(me_status(&server, &alice_token).await, 200);
}

/// A client whose requests come from `ip` (any 127.x address is loopback on Linux).
pub(crate) fn client_from(ip: [u8; 4]) -> reqwest::Client {
    let _ = http(); // installs the TLS provider reqwest needs to build a client
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

pub(crate) async fn attempt(
    client: &reqwest::Client,
    server: &Served,
    user: &str,
    password: &str,
) -> (u16, reqwest::header::HeaderMap) {
    let response = client
        .post(format!("{}/auth/login", server.base))
        .json(&json!({ "username": user, "password": password }))
        .send()
        .await
        .expect("request");
    (response.status().as_u16(), response.headers().clone())
}

/// Unified mode: two instances share each budget through PostgreSQL, exactly. A client that
/// always reaches one instance gets the whole budget there (not half of it), and the other
/// instance then refuses it too.
#[tokio::test]
async fn in_unified_mode_instances_share_one_api_budget_through_postgres() {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let limit = [("RATE_LIMIT_API", "4/1m")];
    let a = serve_shared(&db, None, &limit).await;
    let b = serve_shared(&db, None, &limit).await;
    let token = access(&register(&a, "grace", "grace's password").await);
    // Long enough for both to hear each other's heartbeats on the bus (50 ms apart): the
    // local fallback would then give each instance half the budget.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for remaining in ["3", "2", "1", "0"] {
        let reply = call(&a, "GET", "/me", Some(&token), None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("ratelimit-remaining"), Some(remaining));
        assert_eq!(reply.header("ratelimit-policy"), Some("4;w=60"));
    }
    for server in [&b, &a] {
        let limited = call(server, "GET", "/me", Some(&token), None).await;
        assert_eq!(limited.status, 429, "{}", limited.body);
        let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=15).contains(&retry),
            "one request back every 15 s: {retry}"
        );
    }
    assert_eq!(
        count(
            &pg,
            &db,
            "SELECT count(*) FROM rate_limits WHERE key LIKE '%api:%'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn api_limit_and_headers_on_authenticated_routes() {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let server = serve(&db, None, &[("RATE_LIMIT_API", "3/1m")]).await;
    let token = access(&register(&server, "heidi", "heidi's password").await);
    for remaining in ["2", "1", "0"] {
        let reply = call(&server, "GET", "/me", Some(&token), None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("ratelimit-remaining"), Some(remaining));
        assert_eq!(reply.header("ratelimit-policy"), Some("3;w=60"));
    }
    let limited = call(&server, "GET", "/me", Some(&token), None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["code"], "rate_limited");
    assert!(limited.header("retry-after").is_some());
    // Another user has their own budget.
    let other = access(&register(&server, "ivan", "ivan's password").await);
    assert_eq!(me_status(&server, &other).await, 200);
}

#[tokio::test]
async fn sessions_slide_while_used_expire_when_idle_and_are_cleaned_up() {
    let _ = sessions_slide_expire_and_are_cleaned_up(&[]).await;
}

/// Unified mode: sessions slide and are cleaned up with no Redis, and so are expired cache
/// rows (`CACHE_CLEANUP_INTERVAL`): a session's cached copy leaves `cache_entries` once its
/// TTL is over.
#[tokio::test]
async fn sessions_and_cache_rows_expire_and_are_cleaned_up_in_unified_mode() {
    let unified = [
        ("CACHE_BACKEND", "postgres"),
        ("CACHE_CLEANUP_INTERVAL", "1s"),
        ("CACHE_TTLS_JSON", r#"{"sessions":5000}"#),
    ];
    let (pg, db, server) = sessions_slide_expire_and_are_cleaned_up(&unified).await;
    let sql = "SELECT count(*) FROM cache_entries WHERE key LIKE 'session:%'";
    let token = access(&login(&server, "judy", "judy's password").await);
    assert_eq!(me_status(&server, &token).await, 200);
    assert!(
        count(&pg, &db, sql).await >= 1,
        "the session is cached in PostgreSQL"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&pg, &db, sql).await > 0 {
        assert!(
            Instant::now() < deadline,
            "an expired cache row was not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With `extra` settings; returns the server and its database.
async fn sessions_slide_expire_and_are_cleaned_up(
    extra: &[(&str, &str)],
) -> (PgServer, String, Served) {
    let pg = PgServer::start().await;
    let db = pg.fresh_database().await;
    let mut settings = vec![
        ("SESSION_DEFAULT_TTL", "4s"),
        ("SESSION_CLEANUP_INTERVAL", "1s"),
    ];
    settings.extend_from_slice(extra);
    let server = serve(&db, None, &settings).await;
    let tokens = register(&server, "judy", "judy's password").await;
    let token = access(&tokens);
    // Used every half second for 7 s: well past the first expiry, still valid.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        assert_eq!(
            me_status(&server, &token).await,
            200,
            "at {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Idle longer than the lifetime: expired, then removed by the cleanup task.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reply = call(&server, "GET", "/me", Some(&token), None).await;
    assert_unauthorized(&reply, "idle session");
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&pg, &db, "SELECT count(*) FROM auth_sessions").await > 0 {
        assert!(Instant::now() < deadline, "expired session not cleaned up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (pg, db, server)
}

#[tokio::test]
async fn tokens_and_account_data_are_never_stored_by_caches() {
    let pg = PgServer::start().await;
    let server = serve(&pg.fresh_database().await, None, &[]).await;
    let body = json!({ "username": "nostore", "password": "a long password" });
    let registered = call(&server, "POST", "/auth/register", None, Some(body.clone())).await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let logged_in = call(&server, "POST", "/auth/login", None, Some(body)).await;
    let token = access(&logged_in.body);
    let refreshed = refresh(&server, &logged_in.body["refresh_token"]).await;
    let me = call(&server, "GET", "/me", Some(&token), None).await;
    let sessions = call(&server, "GET", "/me/sessions", Some(&token), None).await;
    let refused = call(&server, "GET", "/me", Some("not-a-token"), None).await;
    for (what, reply) in [
        ("register", &registered),
        ("login", &logged_in),
        ("refresh", &refreshed),
        ("/me", &me),
        ("/me/sessions", &sessions),
        ("a refused /me", &refused),
    ] {
        assert_eq!(reply.header("cache-control"), Some("no-store"), "{what}");
    }
}
