//! Bad frames get an error (or, past the frame limit, a 1009 close), never a panic: the
//! connection and the server go on.

use serde_json::json;
use yawc::Frame;

use crate::support::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_binary_unknown_and_oversized_messages_get_errors_and_the_socket_lives() {
    let world = World::start(
        1,
        &[
            ("WS_MAX_MESSAGE_BYTES", "1024".into()),
            ("WS_MAX_FRAME_BYTES", "8192".into()),
        ],
    )
    .await;
    let alice = world.register("alice").await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    let cases: Vec<(Frame, &str)> = vec![
        (Frame::text("{not json"), "bad_json"),
        (Frame::text("[1,2]"), "bad_json"),
        (Frame::text(r#"{"type":"dance"}"#), "unknown_type"),
        (Frame::text(r#"{"channel":"cascade-events"}"#), "unknown_type"),
        (Frame::text(r#"{"type":"subscribe"}"#), "bad_request"),
        (Frame::text(r#"{"type":"subscribe","channel":"cascade-events","since":{"offset":-1,"epoch":"x"}}"#), "bad_request"),
        (Frame::text(r#"{"type":"publish","channel":"consciousness-stream"}"#), "bad_request"),
        (Frame::text(r#"{"type":"unsubscribe","channel":"cascade-events"}"#), "not_subscribed"),
        (Frame::binary(vec![0u8, 159, 146, 150]), "binary_unsupported"),
        (
            Frame::text(json!({"type": "publish", "channel": "consciousness-stream", "payload": "x".repeat(2000)}).to_string()),
            "too_large",
        ),
    ];
    for (frame, code) in cases {
        client.send_frame(frame).await;
        let answer = client.json().await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], code, "{answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // An id is echoed on errors too.
    let (answer, _) = client
        .request(json!({"type": "subscribe", "channel": 7}))
        .await;
    assert_eq!(answer["code"], "bad_request");
    // Still serving.
    assert_eq!(
        client.subscribe("consciousness-stream").await["type"],
        "ack"
    );
    assert_eq!(
        client
            .publish("consciousness-stream", json!({"ok": true}))
            .await["type"],
        "ack"
    );
    assert_eq!(client.json().await["payload"]["ok"], true);

    // Past the frame limit: closed with 1009, and only that connection.
    let mut other = world.connect(0, Some(&alice.token)).await;
    client.send_frame(Frame::text("x".repeat(10_000))).await;
    // The server queues a 1009 close, but it closes the socket with the rest of the frame
    // unread, so the kernel may reset the connection before the client reads the close.
    let ended = client.closed().await;
    assert!(matches!(ended, Some(1009) | None), "closed with {ended:?}");
    assert!(
        world
            .metric(0, "cascade_ws_closes_total", "reason=\"too_large\"")
            .await
            >= 1.0
    );
    let (pong, _) = other.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
}
