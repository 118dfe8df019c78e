//! A connection the server closes (here a logout: 4001) while its client has stopped reading
//! and its channel stays busy: what the channel publishes while the close frame waits for the
//! client is not queued for it, so it is not counted as dropped for a full queue
//! (`cascade_ws_dropped_total{reason="queue_full"}` counts slow readers, and an operator
//! alerts on it).
//!
//! A test binary of its own: the `cascade_ws_*` series are the process's, and other tests
//! fill queues on purpose.

#[allow(dead_code)]
#[path = "realtime/support.rs"]
mod support;

use std::time::{Duration, Instant};

use cascade_realtime::Published;
use serde_json::json;

use support::World;

const CHANNEL: &str = "consciousness-stream";

/// Publishes `n` messages of `pad` bytes from the server.
async fn publish(world: &World, n: usize, pad: usize) {
    let rt = world.servers[0].realtime.clone();
    world.servers[0]
        .run(async move {
            let pad = "x".repeat(pad);
            for i in 0..n {
                match rt.publish(CHANNEL, json!({"n": i, "pad": pad})).await {
                    Ok(Published::Durable(_)) => {}
                    other => panic!("Redis is up: every publish is durable: {other:?}"),
                }
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_busy_channel_publishes_while_a_connection_closes_is_not_counted_as_dropped() {
    let world = World::start(
        1,
        &[
            ("WS_QUEUE_SIZE", "100".into()),
            ("WS_MAX_MESSAGE_BYTES", (600 * 1024).to_string()),
            ("WS_WRITE_TIMEOUT", "30s".into()),
        ],
    )
    .await;
    let alice = world.register("alice").await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    assert_eq!(client.subscribe(CHANNEL).await["type"], "ack");
    // The client reads no more. 40 messages of 512 KiB (20 MB) are more than the socket
    // buffers of both ends hold, so the server's write waits; fewer than the queue holds,
    // so none is refused.
    publish(&world, 40, 512 * 1024).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queue_full = || world.metric(0, "cascade_ws_dropped_total", "reason=\"queue_full\"");
    assert_eq!(queue_full().await, 0.0);

    // Logging out closes the connection: its close frame waits (up to 1 s) behind the 20 MB.
    assert_eq!(world.logout(0, &alice).await, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    while world
        .metric(0, "cascade_ws_closes_total", "reason=\"unauthorized\"")
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "the connection was not closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Meanwhile the channel goes on: far more than the queue holds.
    publish(&world, 300, 10).await;
    assert_eq!(
        queue_full().await,
        0.0,
        "messages for a connection being closed were counted as dropped for a full queue"
    );
    drop(client);
}
