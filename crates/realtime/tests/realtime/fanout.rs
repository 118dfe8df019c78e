//! A message published on one instance reaches subscribers on every instance, once.

use std::time::Duration;

use cascade_core::cache::buckets;
use cascade_realtime::Published;
use serde_json::{Value, json};

use crate::support::{Client, Shared, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_either_instance_reaches_subscribers_on_both() {
    publish_on_either_instance_reaches_both(&World::start(2, &[]).await).await;
}

/// The same on a Redis Cluster (3 masters, 3 replicas): a channel's keys share its hash tag,
/// and the fan-out is sharded pub/sub: each of the 4 shard channels is subscribed by both
/// instances (`SSUBSCRIBE`) on the master of its slot, the 4 spread over the 3 masters, and
/// none is a classic subscription (which every node would be sent every message of).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_either_instance_reaches_subscribers_on_both_over_a_redis_cluster() {
    let world = World::start_on_cluster(2).await;
    for server in &world.servers {
        assert!(server.realtime_listening(Duration::from_secs(10)).await);
    }
    let Shared::Cluster(cluster) = &world.redis else {
        unreachable!("a world on a cluster")
    };
    let mut masters = std::collections::BTreeSet::new();
    for shard in 0..4 {
        let channel = format!("cascade:rt:shard:{shard}{}", buckets::spread_tag(shard, 4));
        let master = cluster
            .master_of_slot(cluster.slot_of(&channel))
            .expect("a master");
        masters.insert(master);
        let sharded = cluster.subscribers(&channel, true);
        assert!(sharded.contains(&(master, 2)), "{channel}: {sharded:?}");
        let classic = cluster.subscribers(&channel, false);
        assert!(
            classic.iter().all(|(_, n)| *n == 0),
            "{channel}: {classic:?}"
        );
        // Nor under the old, untagged name.
        let old = cluster.subscribers(&format!("cascade:rt:shard:{shard}"), false);
        assert!(old.iter().all(|(_, n)| *n == 0), "{old:?}");
    }
    assert_eq!(masters.len(), 3, "the shards spread over every master");
    publish_on_either_instance_reaches_both(&world).await;
}

async fn publish_on_either_instance_reaches_both(world: &World) {
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

/// Waits (bounded) until instance `n` has ended its degraded period.
async fn durable_again(world: &World, n: usize) {
    for _ in 0..200 {
        if !world.servers[n].realtime.degraded() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("instance {n} still degraded 10 s after Redis came back");
}

/// The next frame of `client` is a `degraded` gap ending `epoch` after `offset`.
async fn expect_degraded_gap(client: &mut Client, epoch: &Value, offset: u64) {
    check_degraded_gap(&client.json().await, epoch, offset);
}

fn check_degraded_gap(gap: &Value, epoch: &Value, offset: u64) {
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["reason"], "degraded", "{gap}");
    assert_eq!(gap["epoch"], *epoch, "{gap}");
    assert_eq!(gap["from"], offset + 1, "{gap}");
    assert!(gap["to"].is_null(), "{gap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_does_not_answer_an_instance_delivers_locally_and_the_others_get_a_gap() {
    let mut world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let channel = "consciousness-stream";
    let mut a1 = world.connect(0, Some(&alice.token)).await;
    let mut a2 = world.connect(0, Some(&alice.token)).await;
    let mut b = world.connect(1, Some(&alice.token)).await;
    let mut away = world.connect(1, Some(&alice.token)).await;
    for client in [&mut a1, &mut a2, &mut b, &mut away] {
        assert_eq!(client.subscribe(channel).await["type"], "ack");
    }
    let before = a1.publish(channel, json!({"n": 0})).await;
    assert_eq!(before["durable"], true, "{before}");
    let (epoch, offset) = (before["epoch"].clone(), before["offset"].as_u64().unwrap());
    for client in [&mut a1, &mut a2, &mut b, &mut away] {
        assert_eq!(client.json().await["payload"]["n"], 0);
    }
    // This client's last position is from before the outage; it comes back after it.
    away.close().await;

    world.redis.server().pause();
    let local = a1.publish(channel, json!({"n": 1})).await;
    assert_eq!(local["type"], "ack", "{local}");
    assert_eq!(local["durable"], false, "{local}");
    assert!(
        local["offset"].is_null() && local["epoch"].is_null(),
        "{local}"
    );
    // Both subscribers on the publishing instance get it, after a gap telling them that
    // messages from elsewhere may not reach them from now on.
    for client in [&mut a1, &mut a2] {
        expect_degraded_gap(client, &epoch, offset).await;
        let message = client.json().await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["payload"]["n"], 1);
        assert_eq!(message["durable"], false);
        assert!(message["offset"].is_null() && message["epoch"].is_null());
    }
    // Not the subscriber on the other instance; its connection stays.
    let (pong, extra) = b.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "connections outlive Redis");
    assert!(
        extra.is_empty(),
        "crossed instances without Redis: {extra:?}"
    );
    world.redis.server().resume();

    // Once Redis answers, the other instance's subscriber is told what it could not get.
    // The publish that missed its deadline was still in Redis's socket: it may have been
    // carried out when Redis woke up, then it is in the history and reaches B once (A's
    // subscribers, which had it, drop that copy).
    let mut next = b.json().await;
    let mut last = offset;
    if next["type"] == "message" {
        assert_eq!(next["payload"]["n"], 1, "{next}");
        assert_eq!(next["epoch"], epoch);
        assert_eq!(next["offset"], offset + 1);
        last += 1;
        next = b.json().await;
    }
    check_degraded_gap(&next, &epoch, last);
    durable_again(&world, 0).await;
    // Cross-instance delivery is back, in a new epoch, with no second gap on A.
    let after = a1.publish(channel, json!({"n": 2})).await;
    assert_eq!(after["durable"], true, "{after}");
    assert_ne!(after["epoch"], epoch, "the degraded period ended the epoch");
    assert_eq!(after["offset"], 1);
    for client in [&mut a1, &mut a2, &mut b] {
        let message = client.json().await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["payload"]["n"], 2);
        assert_eq!(message["epoch"], after["epoch"]);
        assert_eq!(message["offset"], 1);
    }
    // A client resuming from before the outage gets the gap too, then what followed.
    let mut back = world.connect(1, Some(&alice.token)).await;
    let (ack, _) = back
        .request(json!({"type": "subscribe", "channel": channel, "since": {"offset": offset, "epoch": epoch}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    expect_degraded_gap(&mut back, &epoch, offset).await;
    let message = back.json().await;
    assert_eq!(message["payload"]["n"], 2, "{message}");
    // Nothing more, nothing twice.
    for client in [&mut a1, &mut a2, &mut b, &mut back] {
        let (_, extra) = client.request(json!({"type": "ping"})).await;
        assert!(extra.is_empty(), "more than expected: {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_publishes_while_redis_is_down_are_local_and_durability_comes_back_after_a_restart()
 {
    let mut world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let channel = "ai-collaborations";
    let mut a = world.connect(0, Some(&alice.token)).await;
    let mut b = world.connect(1, Some(&alice.token)).await;
    for client in [&mut a, &mut b] {
        assert_eq!(client.subscribe(channel).await["type"], "ack");
    }
    let rt = world.servers[0].realtime.clone();
    let first = world.servers[0]
        .run(async move { rt.publish(channel, json!({"n": 0})).await.unwrap() })
        .await;
    let Published::Durable(first) = first else {
        panic!("Redis is up: {first:?}")
    };
    for client in [&mut a, &mut b] {
        assert_eq!(client.json().await["offset"], first.offset);
    }

    world.redis.server().kill();
    let rt = world.servers[0].realtime.clone();
    let local = world.servers[0]
        .run(async move { rt.publish(channel, json!({"n": 1})).await.unwrap() })
        .await;
    assert_eq!(local, Published::LocalOnly);
    expect_degraded_gap(&mut a, &json!(&*first.epoch), first.offset).await;
    let message = a.json().await;
    assert_eq!(message["payload"]["n"], 1, "{message}");
    assert_eq!(message["durable"], false);
    world.redis.server().restart().await;

    // The other instance's subscriber learns it missed something (the data is gone too).
    let gap = b.json().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["epoch"], &*first.epoch);
    assert_eq!(gap["from"], first.offset + 1);
    durable_again(&world, 0).await;
    let rt = world.servers[0].realtime.clone();
    let again = world.servers[0]
        .run(async move { rt.publish(channel, json!({"n": 2})).await.unwrap() })
        .await;
    let Published::Durable(again) = again else {
        panic!("Redis is back: {again:?}")
    };
    assert_ne!(again.epoch, first.epoch);
    for client in [&mut a, &mut b] {
        let mut message = client.json().await;
        // Redis came back empty: the instance that noticed it before the new epoch began
        // also says it had no epoch meanwhile (one more gap, never a message less).
        while message["type"] == "gap" {
            message = client.json().await;
        }
        assert_eq!(message["payload"]["n"], 2, "{message}");
        assert_eq!(message["epoch"], &*again.epoch);
        let (_, extra) = client.request(json!({"type": "ping"})).await;
        assert!(extra.is_empty(), "more than expected: {extra:?}");
    }
}
