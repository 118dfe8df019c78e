//! A message published on one instance reaches subscribers on every instance, once.

use serde_json::json;

use crate::support::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_either_instance_reaches_subscribers_on_both() {
    let world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    let mut a = world.connect(0, Some(&alice.token)).await;
    let mut b = world.connect(1, Some(&bob.token)).await;
    assert_eq!(a.hello["version"], 1);
    assert_eq!(a.hello["user_id"], alice.id);
    for client in [&mut a, &mut b] {
        let ack = client.subscribe("consciousness-stream").await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let first = a
        .publish("consciousness-stream", json!({"from": "a"}))
        .await;
    assert_eq!(first["type"], "ack", "{first}");
    let second = b
        .publish("consciousness-stream", json!({"from": "b"}))
        .await;
    assert_eq!(second["offset"], first["offset"].as_u64().unwrap() + 1);
    assert_eq!(second["epoch"], first["epoch"]);
    for client in [&mut a, &mut b] {
        for (from, ack) in [("a", &first), ("b", &second)] {
            let message = client.json().await;
            assert_eq!(message["type"], "message", "{message}");
            assert_eq!(message["channel"], "consciousness-stream");
            assert_eq!(message["payload"]["from"], from);
            assert_eq!(message["offset"], ack["offset"]);
            assert_eq!(message["epoch"], ack["epoch"]);
            assert!(message["time"].as_i64().unwrap() > 0);
        }
    }
    // Nothing twice.
    for client in [&mut a, &mut b] {
        let (pong, extra) = client.request(json!({"type": "ping"})).await;
        assert_eq!(pong["type"], "pong");
        assert!(extra.is_empty(), "delivered again: {extra:?}");
    }
    assert!(world.metric(0, "cascade_ws_connections", "").await >= 1.0);
    assert!(
        world
            .metric(0, "cascade_ws_messages_total", "direction=\"out\"")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_events_reach_their_channels_once_from_any_instance() {
    let world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let mut a = world.connect(0, Some(&alice.token)).await;
    let mut b = world.connect(1, Some(&alice.token)).await;
    let mine = format!("user:{}", alice.id);
    for client in [&mut a, &mut b] {
        assert_eq!(client.subscribe("cascade-events").await["type"], "ack");
        assert_eq!(client.subscribe(&mine).await["type"], "ack");
    }
    // Raised on instance 1, as the application's writes do.
    let events = world.servers[1].events.clone();
    let channel = mine.clone();
    world.servers[1]
        .run(async move {
            events
                .publish(
                    "cascade-events",
                    "pattern.changed",
                    json!({"type": "economic"}),
                )
                .await
                .unwrap();
            events
                .publish(&channel, "tier_changed", json!({"tier": "pro"}))
                .await
                .unwrap();
        })
        .await;
    for client in [&mut a, &mut b] {
        // Two channels, two shards: their relative order is not promised.
        let mut got = [client.json().await, client.json().await];
        got.sort_by_key(|m| m["channel"].as_str().unwrap().to_string());
        let (feed, personal) = (&got[0], &got[1]);
        assert_eq!(feed["channel"], "cascade-events", "{feed}");
        assert_eq!(feed["payload"]["event"], "pattern.changed");
        assert_eq!(feed["payload"]["data"]["type"], "economic");
        assert_eq!(personal["channel"], mine.as_str());
        assert_eq!(personal["payload"]["event"], "tier_changed");
        let (_, extra) = client.request(json!({"type": "ping"})).await;
        assert!(extra.is_empty(), "an event bridged twice: {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_asset_changes_are_announced_on_cascade_events() {
    let world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let mut listener = world.connect(1, Some(&alice.token)).await;
    assert_eq!(listener.subscribe("cascade-events").await["type"], "ack");
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{}{path}", world.base(0)))
            .bearer_auth(&alice.token)
            .json(&body)
            .send()
    };
    let producer = post("/producers", json!({"producerId": "p-rt", "name": "P"}))
        .await
        .unwrap();
    assert_eq!(producer.status(), 201);
    let asset = post(
        "/assets",
        json!({"versionId": "v-rt-1", "producerId": "p-rt", "name": "A"}),
    )
    .await
    .unwrap();
    assert_eq!(asset.status(), 201);
    let deleted = http
        .delete(format!("{}/listings/v-rt-1", world.base(0)))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    for change in ["created", "deleted"] {
        let message = listener.json().await;
        assert_eq!(message["payload"]["event"], "asset.changed", "{message}");
        assert_eq!(message["payload"]["data"]["version_id"], "v-rt-1");
        assert_eq!(message["payload"]["data"]["change"], change);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_does_not_answer_publishes_are_refused_and_connections_stay() {
    let world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let mut a = world.connect(0, Some(&alice.token)).await;
    let mut b = world.connect(1, Some(&alice.token)).await;
    for client in [&mut a, &mut b] {
        assert_eq!(
            client.subscribe("consciousness-stream").await["type"],
            "ack"
        );
    }
    world.redis.pause();
    let refused = a.publish("consciousness-stream", json!({"n": 1})).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    let (pong, _) = b.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "connections outlive Redis");
    world.redis.resume();
    // Delivery across instances comes back by itself.
    let mut acked = None;
    for _ in 0..100 {
        let answer = a.publish("consciousness-stream", json!({"n": 2})).await;
        if answer["type"] == "ack" {
            acked = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let acked = acked.expect("publishing resumed");
    for client in [&mut a, &mut b] {
        let message = client.json().await;
        assert_eq!(message["payload"]["n"], 2, "{message}");
        assert_eq!(message["offset"], acked["offset"]);
    }
}
