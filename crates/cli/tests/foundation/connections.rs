//! Connections have deadlines and a cap: a client that never finishes its request head, or a
//! keep-alive connection left idle, is closed; past `MAX_CONNECTIONS` new connections wait in
//! the accept backlog until one closes. Driven over raw TCP, since an HTTP client library
//! always finishes its headers and manages its own connections.

use std::time::{Duration, Instant};

use cascade_testkit::PgServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Served, http};

const GET_HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n";

async fn connect(served: &Served) -> TcpStream {
    let address = served.base.trim_start_matches("http://");
    TcpStream::connect(address).await.expect("connect")
}

/// Reads one response (head and `Content-Length` body) and returns its status; `None` when
/// nothing complete arrives within `bound`.
async fn read_response(stream: &mut TcpStream, bound: Duration) -> Option<u16> {
    let work = async {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().expect("content-length"))
                    .expect("a response with a content-length");
                if buffer.len() >= end + 4 + length {
                    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
                    return status;
                }
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(bound, work).await.ok().flatten()
}

/// Waits until the server closes `stream` (end of file or a reset), for at most `bound`;
/// returns how long that took, `None` if it is still open.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    let closed = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(bound, closed)
        .await
        .ok()
        .map(|_| started.elapsed())
}

async fn serve(settings: &[(&str, &str)]) -> (PgServer, Served) {
    let pg = PgServer::start().await;
    let mut env = vec![("DATABASE_URL", pg.fresh_database().await)];
    env.extend(settings.iter().map(|(k, v)| (*k, v.to_string())));
    let served = Served::start(&env).await;
    (pg, served)
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected_after_the_header_timeout() {
    let (_pg, served) = serve(&[("HEADER_READ_TIMEOUT", "500ms"), ("IDLE_TIMEOUT", "60s")]).await;
    let mut stream = connect(&served).await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // Slowloris: one more header line every 100 ms, never the blank line that ends the head.
    let started = Instant::now();
    let mut closed = false;
    let mut line = 0;
    while started.elapsed() < Duration::from_secs(5) {
        line += 1;
        if stream
            .write_all(format!("X-Slow-{line}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        if closed_within(&mut stream, Duration::from_millis(100))
            .await
            .is_some()
        {
            closed = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(
        closed,
        "a connection that never finished its head is still open after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(400),
        "closed before the header timeout: {elapsed:?}"
    );
    // The server itself is fine.
    assert_eq!(served.get_json("/health").await.0, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (_pg, served) =
        serve(&[("HEADER_READ_TIMEOUT", "300ms"), ("IDLE_TIMEOUT", "1500ms")]).await;
    let mut stream = connect(&served).await;
    stream.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut stream, Duration::from_secs(5)).await,
        Some(200)
    );
    // Idle for longer than the header timeout: the connection is kept for the next request.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut stream, Duration::from_secs(5)).await,
        Some(200),
        "a keep-alive connection idle for less than IDLE_TIMEOUT serves the next request"
    );
    // Then left idle: closed after IDLE_TIMEOUT.
    let elapsed = closed_within(&mut stream, Duration::from_secs(6))
        .await
        .expect("an idle keep-alive connection is still open 6 s later");
    assert!(
        elapsed >= Duration::from_millis(1200),
        "closed before the idle timeout: {elapsed:?}"
    );
}

#[tokio::test]
async fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let (_pg, served) = serve(&[
        ("MAX_CONNECTIONS", "2"),
        ("HEADER_READ_TIMEOUT", "30s"),
        ("IDLE_TIMEOUT", "30s"),
    ])
    .await;
    // Two keep-alive connections take the two places (generous bounds: the start-up probe's
    // connection may still be closing).
    let mut first = connect(&served).await;
    first.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut first, Duration::from_secs(10)).await,
        Some(200)
    );
    let mut second = connect(&served).await;
    second.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut second, Duration::from_secs(10)).await,
        Some(200)
    );

    // A third connects (the kernel's backlog accepts it) but is not served.
    let mut third = connect(&served).await;
    third.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut third, Duration::from_secs(1)).await,
        None,
        "the third connection was served while two were open and MAX_CONNECTIONS=2"
    );

    // The connections already open are still served.
    first.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut first, Duration::from_secs(5)).await,
        Some(200)
    );

    // One closes: the waiting one is served.
    drop(second);
    assert_eq!(
        read_response(&mut third, Duration::from_secs(5)).await,
        Some(200),
        "the waiting connection was not served after one closed"
    );
    drop(first);
    drop(third);
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        http().get(format!("{}/health", served.base)).send(),
    )
    .await
    .expect("the server answers new connections once below the cap")
    .unwrap();
    assert_eq!(response.status(), 200);
}
