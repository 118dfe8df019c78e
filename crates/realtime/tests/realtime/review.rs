//! What a hostile review found: a Redis that comes back from an older snapshot, positions
//! past a channel's head, and clients that stop reading.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Client, Incoming, World};

const CHANNEL: &str = "ai-collaborations";

/// Publishes `{"n": n}` on instance 0 until Redis takes it; its (epoch, offset).
async fn publish(world: &World, n: u64) -> (String, u64) {
    world.publish_durable(CHANNEL, json!({"n": n})).await
}

/// Subscribes with `since`, retrying while the instance has no Redis yet; the answer and
/// what came before it.
async fn resume(client: &mut Client, since: Value) -> (Value, Vec<Value>) {
    for _ in 0..100 {
        let (answer, other) = client
            .request(json!({"type": "subscribe", "channel": CHANNEL, "since": since}))
            .await;
        if answer["type"] == "ack" {
            return (answer, other);
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the subscription never succeeded");
}

/// The next message or gap, skipping nothing else.
async fn next(client: &mut Client) -> Value {
    match client.next().await {
        Some(Incoming::Json(value)) => value,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_older_snapshot_is_a_new_epoch_never_reused_offsets() {
    let mut world = World::start(1, &[]).await;
    let alice = world.register("alice").await;
    for n in 1..=3 {
        publish(&world, n).await;
    }
    world.redis.server().save();
    let mut last = (String::new(), 0);
    for n in 4..=5 {
        last = publish(&world, n).await;
    }
    assert_eq!(last.1, 5);
    // Back from the snapshot: offsets 4 and 5 are gone, the counter says 3.
    world.redis.server().restart().await;

    let mut client = world.connect(0, Some(&alice.token)).await;
    let (ack, before) = resume(&mut client, json!({"offset": 5, "epoch": last.0})).await;
    let mut seen = before;
    seen.extend(client.drain().await);
    let gap = seen
        .iter()
        .find(|m| m["type"] == "gap")
        .unwrap_or_else(|| panic!("no gap for the lost offsets: {ack} {seen:?}"));
    assert_eq!(gap["epoch"], json!(last.0), "{gap}");
    assert_eq!(gap["from"], 6, "{gap}");

    // The next publish is not offset 4 of the old epoch (which the client would drop as a
    // duplicate of what it had): it arrives.
    let (epoch, _) = publish(&world, 6).await;
    assert_ne!(epoch, last.0, "a Redis process change starts a new epoch");
    let message = loop {
        let m = next(&mut client).await;
        if m["type"] == "message" {
            break m;
        }
    };
    assert_eq!(message["payload"]["n"], 6, "{message}");
    assert_eq!(message["epoch"], json!(epoch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_past_the_head_gets_a_gap_and_the_socket_lives() {
    let world = World::start(1, &[]).await;
    let alice = world.register("alice").await;
    let (epoch, head) = publish(&world, 1).await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    let (ack, mut seen) = resume(
        &mut client,
        json!({"offset": u64::MAX, "epoch": epoch.clone()}),
    )
    .await;
    seen.extend(client.drain().await);
    assert_eq!(ack["offset"], head, "{ack}");
    let gap = seen
        .iter()
        .find(|m| m["type"] == "gap")
        .unwrap_or_else(|| panic!("no gap: {ack} {seen:?}"));
    assert_eq!(gap["reason"], "offset_ahead", "{gap}");
    // Live messages follow from the head, and the connection still answers.
    publish(&world, 2).await;
    let message = next(&mut client).await;
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["offset"], head + 1);
    let (pong, _) = client.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
}

/// A client subscribed before a channel's first message stands at `epoch` null, offset 0
/// (its `ack`). Resuming from there with `since` gives it the channel from its first message;
/// a subscribe without `since` starts at the head, so a client that resumed that way while
/// the first publish went out silently lost it (the failover drill's checker did, under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_left_before_the_first_message_resumes_from_it_with_since_offset_0() {
    let world = World::start(1, &[]).await;
    let alice = world.register("alice").await;
    let mut early = world.connect(0, Some(&alice.token)).await;
    let ack = early.subscribe(CHANNEL).await;
    assert_eq!(
        (&ack["epoch"], &ack["offset"]),
        (&Value::Null, &json!(0)),
        "{ack}"
    );
    drop(early);
    let (epoch, _) = publish(&world, 1).await;
    publish(&world, 2).await;

    let mut resumed = world.connect(0, Some(&alice.token)).await;
    let (_, mut seen) = resume(&mut resumed, json!({"offset": 0, "epoch": null})).await;
    seen.extend(resumed.drain().await);
    let got: Vec<(&Value, &Value)> = seen.iter().map(|m| (&m["epoch"], &m["offset"])).collect();
    assert_eq!(
        got,
        [(&json!(epoch), &json!(1)), (&json!(epoch), &json!(2))],
        "{seen:?}"
    );

    // Without `since`: from the head on, what was published before is not replayed.
    let mut fresh = world.connect(0, Some(&alice.token)).await;
    let ack = fresh.subscribe(CHANNEL).await;
    assert_eq!(ack["offset"], 2, "{ack}");
    publish(&world, 3).await;
    let message = next(&mut fresh).await;
    assert_eq!(message["offset"], 3, "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_within_the_write_timeout() {
    let world = World::start(
        1,
        &[
            ("WS_WRITE_TIMEOUT", "1s".into()),
            // The queue never fills: only the write deadline can end the connection.
            ("WS_QUEUE_SIZE", "100000".into()),
        ],
    )
    .await;
    let alice = world.register("alice").await;
    let mut reader = world.connect(0, Some(&alice.token)).await;
    assert_eq!(reader.subscribe(CHANNEL).await["type"], "ack");
    // More than the loopback socket buffers hold (a few MB each way); then nothing more.
    let rt = world.servers[0].realtime.clone();
    world.servers[0]
        .run(async move {
            let big = "x".repeat(60_000);
            for n in 0..400 {
                rt.publish(CHANNEL, json!({"n": n, "pad": big}))
                    .await
                    .unwrap();
            }
        })
        .await;
    let mut closed = 0.0;
    for _ in 0..150 {
        closed = world
            .metric(0, "cascade_ws_closes_total", "reason=\"write_timeout\"")
            .await;
        if closed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(closed, 1.0, "the stalled connection was not closed");
    drop(reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_within_the_write_delay_go_out_together_in_order() {
    let world = World::start(1, &[("WS_WRITE_DELAY", "100ms".into())]).await;
    let alice = world.register("alice").await;
    let mut reader = world.connect(0, Some(&alice.token)).await;
    assert_eq!(reader.subscribe(CHANNEL).await["type"], "ack");
    // Past the delay after the ack: the first message finds the connection quiet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = std::time::Instant::now();
    publish(&world, 0).await;
    assert_eq!(next(&mut reader).await["payload"]["n"], 0);
    // Published after message 0 was written: they wait for the next write, 100 ms after
    // that one (which came after `before`), all of them.
    for n in 1..=5 {
        publish(&world, n).await;
    }
    for n in 1..=5 {
        let message = next(&mut reader).await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["payload"]["n"], n, "{message}");
        if n == 1 {
            let waited = before.elapsed();
            assert!(
                waited >= Duration::from_millis(100),
                "message 1 arrived {waited:?} after message 0 was published"
            );
        }
    }
    assert!(reader.drain().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_stops_at_its_byte_cap_with_an_exact_gap() {
    let world = World::start(1, &[("WS_REPLAY_MAX_BYTES", "50000".into())]).await;
    let alice = world.register("alice").await;
    let rt = world.servers[0].realtime.clone();
    let epoch = world.servers[0]
        .run(async move {
            let pad = "x".repeat(10_000);
            let mut epoch = String::new();
            for n in 1..=20 {
                if let cascade_realtime::Published::Durable(at) = rt
                    .publish(CHANNEL, json!({"n": n, "pad": pad}))
                    .await
                    .unwrap()
                {
                    epoch = at.epoch.to_string();
                }
            }
            epoch
        })
        .await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    let (ack, mut seen) = resume(&mut client, json!({"offset": 1, "epoch": epoch})).await;
    assert_eq!(ack["offset"], 20, "{ack}");
    seen.extend(client.drain().await);
    let offsets: Vec<u64> = seen
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    // 10 KB each: five fit under the cap, and the gap names exactly the rest.
    assert_eq!(offsets, (2..=6).collect::<Vec<_>>(), "{seen:?}");
    let gap = seen.iter().find(|m| m["type"] == "gap").expect("a gap");
    assert_eq!(
        (&gap["from"], &gap["to"], &gap["reason"]),
        (&json!(7), &json!(20), &json!("history_trimmed")),
        "{gap}"
    );
}

/// A fresh login of `name`: (access token, refresh token).
async fn login(world: &World, name: &str) -> (String, String) {
    let login = json!({"username": name, "password": "correct horse battery"});
    let (status, body) = world.post("/auth/login", login).await;
    assert_eq!(status, 200, "{body}");
    let token = |field: &str| body[field].as_str().unwrap().to_string();
    (token("access_token"), token("refresh_token"))
}

async fn post(world: &World, path: &str, body: Value) -> u16 {
    world.post(path, body).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_or_reusing_a_refresh_token_closes_the_sockets_it_opened() {
    let world = World::start(2, &[("REFRESH_GRACE", "0s".into())]).await;
    let alice = world.register("alice").await;
    let (second, second_refresh) = login(&world, "alice").await;
    let (third, third_refresh) = login(&world, "alice").await;
    let mut first_socket = world.connect(1, Some(&alice.token)).await;
    let mut second_socket = world.connect(1, Some(&second)).await;
    let mut third_socket = world.connect(1, Some(&third)).await;

    // An access token (revoked on instance 0): only its socket (on instance 1) closes.
    assert_eq!(
        post(&world, "/auth/revoke", json!({"token": alice.token})).await,
        200
    );
    assert_eq!(first_socket.closed().await, Some(4001));
    let (pong, _) = second_socket.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");

    // A refresh token ends its session.
    assert_eq!(
        post(&world, "/auth/revoke", json!({"token": second_refresh})).await,
        200
    );
    assert_eq!(second_socket.closed().await, Some(4001));

    // A spent refresh token presented again: the session is revoked as stolen.
    let refresh = json!({"refresh_token": third_refresh});
    assert_eq!(post(&world, "/auth/refresh", refresh.clone()).await, 200);
    assert_eq!(post(&world, "/auth/refresh", refresh).await, 401);
    assert_eq!(third_socket.closed().await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_the_connection_rate_get_rate_limited_and_the_socket_lives() {
    let world = World::start(1, &[("WS_PUBLISH_RATE", "5".into())]).await;
    let alice = world.register("alice").await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    let mut codes = Vec::new();
    for n in 0..40 {
        let answer = client.publish(CHANNEL, json!({"n": n})).await;
        codes.push(answer["code"].as_str().unwrap_or("ack").to_string());
    }
    let acked = codes.iter().filter(|c| *c == "ack").count();
    let limited = codes.iter().filter(|c| *c == "rate_limited").count();
    assert_eq!(acked + limited, 40, "{codes:?}");
    assert!(acked >= 5, "the burst passes: {codes:?}");
    assert!(limited >= 1, "40 publishes at once exceed 5/s: {codes:?}");
    let (pong, _) = client.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
}
