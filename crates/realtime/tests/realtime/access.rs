//! Who may connect, read and publish; logout ends the socket.

use std::time::Duration;

use serde_json::json;

use crate::support::{ADMIN_TOKEN, Client, World};

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
    let response = reqwest::Client::new()
        .post(format!("{}/auth/logout", world.base(0)))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
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
