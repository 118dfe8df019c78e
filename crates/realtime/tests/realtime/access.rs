//! Who may connect, read and publish; logout ends the socket.

use std::time::Duration;

use serde_json::json;

use crate::support::{ADMIN_TOKEN, Client, Incoming, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_refuse_who_may_not_read_or_publish_them() {
    let world = World::start(1, &[]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    let mut a = world.connect(0, Some(&alice.token)).await;
    let code = |v: &serde_json::Value| v["code"].as_str().unwrap_or("").to_string();

    assert_eq!(
        code(&a.subscribe(&format!("user:{}", bob.id)).await),
        "forbidden"
    );
    assert_eq!(code(&a.subscribe("admin:metrics").await), "forbidden");
    assert_eq!(
        code(&a.subscribe("space:nobody-is-here").await),
        "forbidden"
    );
    assert_eq!(code(&a.subscribe("no-such-channel").await), "bad_channel");
    assert_eq!(
        code(&a.publish("cascade-events", json!(1)).await),
        "forbidden"
    );
    assert_eq!(
        code(&a.publish(&format!("user:{}", alice.id), json!(1)).await),
        "forbidden"
    );
    assert_eq!(
        code(&a.publish("space:nobody-is-here", json!(1)).await),
        "forbidden"
    );
    assert_eq!(
        code(&a.publish("admin:metrics", json!(1)).await),
        "forbidden"
    );
    // What is allowed is allowed.
    assert_eq!(
        a.subscribe(&format!("user:{}", alice.id)).await["type"],
        "ack"
    );
    assert_eq!(a.subscribe("cascade-events").await["type"], "ack");
    assert_eq!(
        a.publish("ai-collaborations", json!({"x": 1})).await["type"],
        "ack"
    );

    // The operator reads the admin channel the server publishes on; accounts never see it.
    let mut admin = world.connect(0, Some(ADMIN_TOKEN)).await;
    assert_eq!(admin.hello["admin"], true);
    assert_eq!(admin.subscribe("admin:metrics").await["type"], "ack");
    assert_eq!(
        code(&admin.publish("admin:metrics", json!(1)).await),
        "forbidden"
    );
    let rt = world.servers[0].realtime.clone();
    let at = world.servers[0]
        .run(async move { rt.publish("admin:metrics", json!({"rps": 12})).await })
        .await
        .unwrap();
    let cascade_realtime::Published::Durable(at) = at else {
        panic!("Redis is up: {at:?}")
    };
    let message = admin.json().await;
    assert_eq!(message["channel"], "admin:metrics");
    assert_eq!(message["payload"]["rps"], 12);
    assert_eq!(message["offset"], at.offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_nothing_is_read() {
    let world = World::start(1, &[("WS_AUTH_TIMEOUT", "1s".into())]).await;
    let alice = world.register("alice").await;
    // A bad header token: refused before the upgrade.
    let refused = Client::connect(world.base(0), Some("not-a-token")).await;
    assert!(
        refused.is_err_and(|e| e.contains("401")),
        "upgraded with a bad token"
    );

    // No header: nothing but `auth` is served, and only for the deadline.
    let mut anonymous = world.connect(0, None).await;
    assert_eq!(anonymous.hello["authenticated"], false);
    let answer = anonymous.subscribe("cascade-events").await;
    assert_eq!(answer["code"], "unauthorized", "{answer}");
    assert_eq!(anonymous.closed().await, Some(4001), "no auth in time");

    // A first `auth` message authenticates.
    let mut late = world.connect(0, None).await;
    let (ack, _) = late
        .request(json!({"type": "auth", "token": alice.token}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["user_id"], alice.id);
    assert_eq!(late.subscribe("cascade-events").await["type"], "ack");
    // Past the auth deadline it is still open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (pong, _) = late.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");

    // A bad token in `auth` closes.
    let mut bad = world.connect(0, None).await;
    bad.send(json!({"type": "auth", "token": "forged"})).await;
    assert_eq!(bad.closed().await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_one_instance_closes_the_sessions_sockets_on_every_instance() {
    let world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    let mut on_b = world.connect(1, Some(&alice.token)).await;
    let mut bystander = world.connect(1, Some(&bob.token)).await;
    assert_eq!(on_b.subscribe("cascade-events").await["type"], "ack");
    assert_eq!(world.logout(0, &alice).await, 204);
    assert_eq!(on_b.closed().await, Some(4001));
    // Another account's socket lives on, and the ended token cannot open a new one.
    let (pong, _) = bystander.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
    assert!(
        Client::connect(world.base(1), Some(&alice.token))
            .await
            .is_err()
    );
    assert!(
        world
            .metric(1, "cascade_ws_closes_total", "reason=\"unauthorized\"")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_per_account_cap_the_upgrade_is_a_503() {
    let world = World::start(1, &[("WS_MAX_CONNECTIONS_PER_USER", "2".into())]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    let _one = world.connect(0, Some(&alice.token)).await;
    let two = world.connect(0, Some(&alice.token)).await;
    let third = Client::connect(world.base(0), Some(&alice.token)).await;
    assert!(
        third.is_err_and(|e| e.contains("503")),
        "a third connection"
    );
    let _bob = world.connect(0, Some(&bob.token)).await;
    // A place is given back when a connection ends.
    two.close().await;
    let mut again = None;
    for _ in 0..50 {
        if let Ok(client) = Client::connect(world.base(0), Some(&alice.token)).await {
            again = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        again.is_some(),
        "the place of a closed connection was not given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_closes_the_socket_unless_a_fresh_one_is_sent() {
    let world = World::start(1, &[("ACCESS_TOKEN_TTL", "4s".into())]).await;
    let alice = world.register("alice").await;
    let mut stale = world.connect(0, Some(&alice.token)).await;
    let mut renewed = world.connect(0, Some(&alice.token)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refreshed: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/auth/refresh", world.base(0)))
        .json(&json!({"refresh_token": alice.refresh_token}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = refreshed["access_token"].as_str().unwrap();
    let (ack, _) = renewed
        .request(json!({"type": "auth", "token": token}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        stale.closed().await,
        Some(4001),
        "closed at the token's expiry"
    );
    let (pong, _) = renewed.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "the renewed connection lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_clients_to_reconnect_then_closes_with_1001() {
    let mut world = World::start(1, &[]).await;
    let alice = world.register("alice").await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    assert_eq!(client.subscribe("cascade-events").await["type"], "ack");
    let server = world.servers.pop().unwrap();
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
    let hint = client.json().await;
    assert_eq!(hint["type"], "reconnect", "{hint}");
    assert_eq!(client.closed().await, Some(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_channel_is_for_the_spaces_participants() {
    use reqwest::Method;
    let world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    for user in [&alice, &bob] {
        world.set_tier(user, "participant").await;
    }
    let space = json!({"space_id": "rt-room", "title": "Room", "max_participants": 5,
                       "consciousness_threshold": "0.50"});
    let (status, body) = world.call(Method::POST, "/spaces", &alice, space).await;
    assert_eq!(status, 201, "{body}");
    let level = json!({"consciousness_level": "0.90"});
    let (status, body) = world
        .call(Method::POST, "/consciousness/sessions", &alice, level)
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = world
        .call(Method::POST, "/spaces/rt-room/join", &alice, json!({}))
        .await;
    assert!(status < 300, "{status} {body}");

    let mut member = world.connect(1, Some(&alice.token)).await;
    let mut outsider = world.connect(1, Some(&bob.token)).await;
    assert_eq!(member.subscribe("space:rt-room").await["type"], "ack");
    assert_eq!(
        outsider.subscribe("space:rt-room").await["code"],
        "forbidden"
    );
    assert_eq!(
        outsider.publish("space:rt-room", json!("hi")).await["code"],
        "forbidden"
    );
    let ack = member
        .publish("space:rt-room", json!({"hello": "room"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(member.json().await["payload"]["hello"], "room");

    // Bob joins too, and follows the room on the other instance.
    let level = json!({"consciousness_level": "0.90"});
    let (status, body) = world
        .call(Method::POST, "/consciousness/sessions", &bob, level)
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = world
        .call(Method::POST, "/spaces/rt-room/join", &bob, json!({}))
        .await;
    assert!(status < 300, "{status} {body}");
    let mut guest = world.connect(0, Some(&bob.token)).await;
    assert_eq!(guest.subscribe("space:rt-room").await["type"], "ack");

    // Leaving the space (on instance 0) ends the open subscription (on instance 1), and
    // closes the channel to new ones.
    let (status, body) = world
        .call(Method::POST, "/spaces/rt-room/leave", &alice, json!({}))
        .await;
    assert!(status < 300, "{status} {body}");
    let told = unsubscribed(&mut member).await;
    assert_eq!(told["channel"], "space:rt-room", "{told}");
    assert_eq!(told["code"], "forbidden", "{told}");
    let mut later = world.connect(0, Some(&alice.token)).await;
    assert_eq!(later.subscribe("space:rt-room").await["code"], "forbidden");
    // What the room says next reaches the participant, not the one who left.
    let ack = guest
        .publish("space:rt-room", json!({"after": "leave"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    loop {
        let m = guest.json().await;
        if m["payload"]["after"] == "leave" {
            break;
        }
    }
    while let Some(Incoming::Json(m)) = member.next_within(Duration::from_secs(1)).await {
        assert_ne!(
            m["type"], "message",
            "a former participant still reads: {m}"
        );
    }
    let (pong, _) = member.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "the socket lives");

    // Closing the space ends every subscription to it.
    let (status, body) = world
        .call(Method::POST, "/spaces/rt-room/close", &alice, json!({}))
        .await;
    assert!(status < 300, "{status} {body}");
    let told = unsubscribed(&mut guest).await;
    assert_eq!(told["code"], "forbidden", "{told}");
}

/// Reads until the server ends a subscription; that message.
async fn unsubscribed(client: &mut crate::support::Client) -> serde_json::Value {
    loop {
        match client.next().await {
            Some(Incoming::Json(m)) if m["type"] == "unsubscribed" => return m,
            Some(Incoming::Json(m)) if m["type"] == "message" => continue,
            other => panic!("expected unsubscribed, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_no_ping_is_closed_as_idle() {
    let world = World::start(
        1,
        &[
            ("WS_PING_INTERVAL", "200ms".into()),
            ("WS_IDLE_TIMEOUT", "1s".into()),
        ],
    )
    .await;
    let alice = world.register("alice").await;
    let mut answering = world.connect(0, Some(&alice.token)).await;
    let mut silent = world.connect(0, Some(&alice.token)).await;
    // Reading lets the client library answer the server's pings; not reading does not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(
            answering.next_within(Duration::from_millis(100)).await,
            None
        );
    }
    assert_eq!(silent.closed().await, Some(1001));
    let (pong, _) = answering.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
    assert!(
        world
            .metric(0, "cascade_ws_closes_total", "reason=\"idle\"")
            .await
            >= 1.0
    );
}
