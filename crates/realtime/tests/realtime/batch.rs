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
    let in_batches: usize = batched.batches.iter().map(|(n, _)| n).sum();
    assert!(in_batches <= 300);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_within_the_message_size_limit() {
    let limit = 2048;
    let world = World::start(1, &[("WS_MAX_MESSAGE_BYTES", limit.to_string())]).await;
    let alice = world.register("alice").await;
    // About 400 bytes each: four or five to a batch.
    let (epoch, last) = burst(&world, 40, 300).await;
    let mut client = Client::connect_batched(world.base(0), Some(&alice.token))
        .await
        .unwrap();
    assert_eq!(client.hello["max_message_bytes"], limit);
    let (ack, _) = client
        .request(json!({"type": "subscribe", "channel": CHANNEL,
                        "since": {"offset": last - 40, "epoch": epoch}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(offsets(&mut client, 40).await, range(last - 39, last));
    assert!(client.batches.len() >= 8, "{:?}", client.batches);
    for (messages, bytes) in &client.batches {
        assert!(*bytes <= limit, "a batch of {messages} in {bytes} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_parameter_that_is_neither_on_nor_off_is_a_400_naming_it() {
    let world = World::start(1, &[]).await;
    let response = reqwest::get(format!("{}/ws?batch=maybe", world.base(0)))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "batch", "{body}");
}
