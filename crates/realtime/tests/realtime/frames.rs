//! Bad frames get an error (or, past the frame limit, a 1009 close), never a panic: the
//! connection and the server go on.

use futures_util::{SinkExt, StreamExt};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_handshake_negotiates_permessage_deflate_and_large_messages_arrive_whole() {
    let world = World::start(1, &[("WS_COMPRESSION_THRESHOLD", "256".into())]).await;
    let alice = world.register("alice").await;
    // What a browser sends: an extension offer and Accept-Encoding (which must not make the
    // edge layer compress the 101).
    let response = reqwest::Client::new()
        .get(format!("{}/ws", world.base(0)))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        )
        .header("Accept-Encoding", "gzip, deflate, br")
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    let headers = response.headers();
    assert_eq!(
        headers["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    let extensions = headers["sec-websocket-extensions"].to_str().unwrap();
    assert!(extensions.starts_with("permessage-deflate"), "{extensions}");
    assert!(
        extensions.contains("server_no_context_takeover"),
        "{extensions}"
    );
    assert!(!headers.contains_key("content-encoding"));

    // A compressing client gets small and large messages intact.
    let url = format!("{}/ws", world.base(0).replacen("http", "ws", 1));
    let mut ws = yawc::WebSocket::connect(url.parse().unwrap())
        .with_request(
            yawc::HttpRequestBuilder::new()
                .header("Authorization", format!("Bearer {}", alice.token)),
        )
        .with_options(yawc::Options::default().with_low_latency_compression())
        .await
        .unwrap();
    let _hello = ws.next().await.unwrap();
    let subscribe = json!({"type": "subscribe", "channel": "ai-collaborations"});
    ws.send(Frame::text(subscribe.to_string())).await.unwrap();
    let big = "abc".repeat(5000);
    for payload in [json!("small"), json!(big)] {
        let publish =
            json!({"type": "publish", "channel": "ai-collaborations", "payload": payload});
        ws.send(Frame::text(publish.to_string())).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(frame.payload()).unwrap();
        if value["type"] == "message" {
            got.push(value["payload"].clone());
        }
    }
    assert_eq!(got, vec![json!("small"), json!(big)]);
}
