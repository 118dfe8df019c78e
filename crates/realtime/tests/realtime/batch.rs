//! Several messages per frame (`GET /ws?batch=1`): a client that opted in gets the messages
//! that queued together as `batch` frames, each message exactly once and in order, live and
//! on resume, never a batch past its size limit; a client that did not never sees one.

use cascade_realtime::Published;
use serde_json::{Value, json};

use crate::support::{Client, World};

const CHANNEL: &str = "ai-collaborations";

/// Publishes `n` messages from the server (`{"n": i, "pad": …}`); the epoch and last offset.
async fn burst(world: &World, n: u64, pad: usize) -> (String, u64) {
    let rt = world.servers[0].realtime.clone();
    world.servers[0]
        .run(async move {
            let mut last = None;
            for i in 1..=n {
                match rt
                    .publish(CHANNEL, json!({"n": i, "pad": "x".repeat(pad)}))
                    .await
                    .unwrap()
                {
                    Published::Durable(at) => last = Some((at.epoch.to_string(), at.offset)),
                    Published::LocalOnly => panic!("Redis is up: every publish is durable"),
                }
            }
            last.unwrap()
        })
        .await
}

/// The next `n` messages of `client` on [`CHANNEL`]: their offsets, in the order read.
async fn offsets(client: &mut Client, n: usize) -> Vec<u64> {
    let mut offsets = Vec::new();
    while offsets.len() < n {
        let message = client.json().await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["channel"], CHANNEL);
        offsets.push(message["offset"].as_u64().unwrap());
    }
    offsets
}

fn range(first: u64, last: u64) -> Vec<u64> {
    (first..=last).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_an_opted_in_client_in_batches_once_and_in_order_and_others_one_by_one() {
    // Writes at most every 100 ms: what a burst queues meanwhile leaves in one write.
    let world = World::start(1, &[("WS_WRITE_DELAY", "100ms".into())]).await;
    let alice = world.register("alice").await;
    let mut batched = Client::connect_batched(world.base(0), Some(&alice.token))
        .await
        .unwrap();
    assert_eq!(batched.hello["batch"], true, "{}", batched.hello);
    let mut plain = world.connect(0, Some(&alice.token)).await;
    assert!(plain.hello.get("batch").is_none(), "{}", plain.hello);
    let mut off = Client::connect_to(world.base(0), "/ws?batch=0", Some(&alice.token))
        .await
        .unwrap();
    assert!(off.hello.get("batch").is_none(), "{}", off.hello);
    let mut head = 0;
    for client in [&mut batched, &mut plain, &mut off] {
        let ack = client.subscribe(CHANNEL).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        head = ack["offset"].as_u64().unwrap();
    }

    let (_, last) = burst(&world, 300, 0).await;
    assert_eq!(last, head + 300);
    assert_eq!(offsets(&mut batched, 300).await, range(head + 1, last));
    assert!(
        !batched.batches.is_empty(),
        "300 messages within a few write delays came one per frame"
    );
    // A burst that takes a few write delays leaves in a few writes: the frames (batches and
    // the messages that came alone) are far fewer than the messages.
    let in_batches: usize = batched.batches.iter().map(|(n, _)| n).sum();
    let frames = batched.batches.len() + (300 - in_batches);
    assert!(
        frames <= 60,
        "300 messages in {frames} frames: {:?}",
        batched.batches
    );
    for client in [&mut plain, &mut off] {
        assert_eq!(offsets(client, 300).await, range(head + 1, last));
        assert!(client.batches.is_empty(), "{:?}", client.batches);
    }
    // Nothing more (no message twice).
    let (answer, extra) = batched.request(json!({"type": "ping"})).await;
    assert_eq!(answer["type"], "pong");
    assert!(extra.is_empty(), "{extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_since_replays_in_batches_then_follows_live() {
    let world = World::start(1, &[]).await;
    let alice = world.register("alice").await;
    let (epoch, last) = burst(&world, 50, 0).await;
    let mut client = Client::connect_batched(world.base(0), Some(&alice.token))
        .await
        .unwrap();
    let since = last - 40;
    let (ack, _) = client
        .request(json!({"type": "subscribe", "channel": CHANNEL,
                        "since": {"offset": since, "epoch": epoch}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["offset"], last);
    // The replay is written in one go: batches, not 40 frames.
    assert_eq!(offsets(&mut client, 40).await, range(since + 1, last));
    assert!(!client.batches.is_empty());
    let (_, live) = burst(&world, 10, 0).await;
    assert_eq!(offsets(&mut client, 10).await, range(last + 1, live));
    let (answer, extra) = client.request(json!({"type": "ping"})).await;
    assert_eq!(answer["type"], "pong");
    assert!(extra.is_empty(), "{extra:?}");
}

/// The `message` object of `offset` in `epoch` with a `pad` of `pad` bytes, as the server
/// encodes it (its `time`, milliseconds since 1970, has 13 digits until 2286).
fn encoded(epoch: &str, offset: u64, pad: usize) -> String {
    let payload = json!({"n": offset, "pad": "x".repeat(pad)}).to_string();
    cascade_realtime::protocol::message(CHANNEL, epoch, offset, 1_764_000_000_000, &payload)
}

/// Publishes `count` messages after `head` (the channel's last offset in `epoch`), each a
/// `message` object of exactly `size` bytes; the last offset.
async fn publish_sized(world: &World, epoch: &str, head: u64, count: u64, size: usize) -> u64 {
    let rt = world.servers[0].realtime.clone();
    let epoch = epoch.to_string();
    world.servers[0]
        .run(async move {
            for offset in head + 1..=head + count {
                let pad = size - encoded(&epoch, offset, 0).len();
                assert_eq!(encoded(&epoch, offset, pad).len(), size);
                let payload = json!({"n": offset, "pad": "x".repeat(pad)});
                match rt.publish(CHANNEL, payload).await.unwrap() {
                    Published::Durable(at) => {
                        assert_eq!((&*at.epoch, at.offset), (epoch.as_str(), offset));
                    }
                    Published::LocalOnly => panic!("Redis is up: every publish is durable"),
                }
            }
            head + count
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_fill_the_size_limit_to_the_byte_and_never_pass_it() {
    // A batch frame of k messages of s bytes is `{"type":"batch","messages":[` (28 bytes),
    // the messages, k - 1 commas and `]}`: four of 499 bytes are 2,029 bytes exactly.
    let limit = 2_029;
    let world = World::start(1, &[("WS_MAX_MESSAGE_BYTES", limit.to_string())]).await;
    let alice = world.register("alice").await;
    let (epoch, head) = burst(&world, 1, 0).await;
    let exact = publish_sized(&world, &epoch, head, 12, 499).await;
    // One byte more each: four would pass the limit by 4 bytes, so three to a frame.
    let over = publish_sized(&world, &epoch, exact, 12, 500).await;
    let mut client = Client::connect_batched(world.base(0), Some(&alice.token))
        .await
        .unwrap();
    assert_eq!(client.hello["max_message_bytes"], limit);
    let (ack, _) = client
        .request(json!({"type": "subscribe", "channel": CHANNEL,
                        "since": {"offset": head, "epoch": epoch}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // The replay is written in one go: the batches are as full as the limit lets them be.
    assert_eq!(offsets(&mut client, 24).await, range(head + 1, over));
    let three = 28 + 3 * 500 + 2 + 2;
    let mut expected = vec![(4, limit); 3];
    expected.extend([(3, three); 4]);
    assert_eq!(client.batches, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_parameter_is_on_or_off_in_any_case_and_anything_else_is_a_400_naming_it() {
    let world = World::start(1, &[]).await;
    let response = reqwest::get(format!("{}/ws?batch=maybe", world.base(0)))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "batch", "{body}");
    for query in ["batch=", "batch=yes", "batch=1&batch=0"] {
        let response = reqwest::get(format!("{}/ws?{query}", world.base(0)))
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], "batch", "{query}: {body}");
    }
    // Any case, percent-encoded or not (`%74rue` is `true`, `%31` is `1`).
    let alice = world.register("alice").await;
    for (query, batch) in [
        ("batch=TRUE", true),
        ("batch=True", true),
        ("batch=%74rue", true),
        ("batch=%31", true),
        ("batch=FALSE", false),
        ("batch=%30", false),
        ("other=1", false),
    ] {
        let client = Client::connect_to(world.base(0), &format!("/ws?{query}"), Some(&alice.token))
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert_eq!(
            client.hello.get("batch").is_some(),
            batch,
            "{query}: {}",
            client.hello
        );
        client.close().await;
    }
}
