//! A client that does not read is closed once its queue is full (1013); a fast one on the same
//! channel loses nothing, and the slow one resumes from history.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Incoming, World};

const MESSAGES: u64 = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_and_a_fast_one_loses_nothing() {
    let world = World::start(
        1,
        &[
            ("WS_QUEUE_SIZE", "100".into()),
            ("WS_HISTORY_MAX_LEN", "5000".into()),
            ("WS_REPLAY_MAX", "5000".into()),
            ("WS_REPLAY_MAX_BYTES", "67108864".into()),
        ],
    )
    .await;
    let alice = world.register("alice").await;
    let mut fast = world.connect(0, Some(&alice.token)).await;
    let mut slow = world.connect(0, Some(&alice.token)).await;
    assert_eq!(fast.subscribe("consciousness-stream").await["type"], "ack");
    assert_eq!(slow.subscribe("consciousness-stream").await["type"], "ack");

    let reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while (offsets.len() as u64) < MESSAGES {
            match fast.next().await {
                Some(Incoming::Json(m)) if m["type"] == "message" => {
                    offsets.push(m["offset"].as_u64().unwrap());
                }
                other => panic!("the fast client got {other:?}"),
            }
        }
        offsets
    });
    // 16 KiB each: far more than the socket buffers of a client that reads nothing.
    let rt = world.servers[0].realtime.clone();
    let filler = "x".repeat(16 * 1024);
    world.servers[0]
        .run(async move {
            for n in 1..=MESSAGES {
                rt.publish("consciousness-stream", json!({"n": n, "fill": filler}))
                    .await
                    .unwrap();
            }
        })
        .await;
    let offsets = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the fast client got everything in time")
        .unwrap();
    assert_eq!(
        offsets,
        (1..=MESSAGES).collect::<Vec<_>>(),
        "in order, none lost"
    );

    // The slow one: what fitted in the socket, then the close.
    let mut last = 0;
    let mut epoch = Value::Null;
    let ended = loop {
        match slow.next().await {
            Some(Incoming::Json(m)) if m["type"] == "message" => {
                epoch = m["epoch"].clone();
                let offset = m["offset"].as_u64().unwrap();
                assert_eq!(offset, last + 1);
                last = offset;
            }
            Some(Incoming::Close(code)) => break code,
            Some(Incoming::Json(other)) => panic!("unexpected {other}"),
            None => break None,
        }
    };
    assert!(last < MESSAGES, "the slow client was not cut off");
    if let Some(code) = ended {
        assert_eq!(code, 1013);
    }
    assert!(
        world
            .metric(0, "cascade_ws_closes_total", "reason=\"queue_full\"")
            .await
            >= 1.0
    );
    assert!(
        world
            .metric(0, "cascade_ws_dropped_total", "reason=\"queue_full\"")
            .await
            >= 1.0
    );

    // It resumes where it was cut off and gets the rest, in order.
    let mut again = world.connect(0, Some(&alice.token)).await;
    let (ack, _) = again
        .request(json!({"type": "subscribe", "channel": "consciousness-stream", "since": {"offset": last, "epoch": epoch}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for expected in last + 1..=MESSAGES {
        let m: Value = again.json().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["offset"].as_u64(), Some(expected));
        assert_eq!(m["payload"]["n"].as_u64(), Some(expected));
    }
}
