//! Real-time (`GET /ws`): how many connections one instance holds and what an idle one costs,
//! and a broadcast to many subscribers of one channel: messages delivered per second and the
//! delivery latency, on one instance and through two (subscribers split over both, the
//! publisher on the first, so half the deliveries cross Redis).
//!
//! The clients are yawc's (the server's own WebSocket library) in this process: they share the
//! machine's cores with the servers, as wrk does in the HTTP scenarios. Latency is from the
//! publisher's send to a subscriber's read, both on this process's monotonic clock.
//!
//! Memory per idle connection is the server process's resident set growth (`VmRSS`) while
//! the connections are opened, divided by their number (Centrifugo states 30–50 KB).
//!
//! The broadcast's subscribers ask for batches (`/ws?batch=1`: messages queued together
//! arrive as one frame), as a client that follows a busy channel would; one row keeps one
//! message per frame for comparison.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use yawc::{Frame, HttpRequestBuilder, OpCode, TcpWebSocket, WebSocket};

use super::Suite;
use super::report::Row;
use super::server::ServerProc;
use crate::measure::{ms, percentiles};

/// The channel of the broadcast (any authenticated user reads and publishes it).
const CHANNEL: &str = "consciousness-stream";
/// Handshakes in flight at once while connections are opened.
const OPENING: usize = 200;

/// What the scenario does at each size.
struct Sizes {
    held: usize,
    subscribers: usize,
    /// Messages published per second.
    rate: u64,
    seconds: u64,
}

/// `second` is a second instance; `delayed` one started with `WS_WRITE_DELAY=5ms`.
pub(super) async fn run(
    suite: &Suite,
    second: &ServerProc,
    delayed: &ServerProc,
) -> anyhow::Result<Vec<Row>> {
    let sizes = if suite.quick {
        Sizes {
            held: 500,
            subscribers: 100,
            rate: 200,
            seconds: 2,
        }
    } else {
        Sizes {
            // The sandbox's hard limit on open files is 20,000 per process (`ulimit -Hn`); the
            // server needs a few hundred of its own.
            held: held_target(),
            subscribers: 1_000,
            rate: 1_000,
            seconds: 10,
        }
    };
    let token = suite.client.token.clone();
    let first = &suite.server;
    let mut rows = vec![held(first, &token, sizes.held).await?];
    let runs: [(&[&ServerProc], bool, &str); 4] = [
        (&[first], true, "ws broadcast, one instance"),
        (&[first], false, "ws broadcast, one instance, no batching"),
        (
            &[delayed],
            true,
            "ws broadcast, one instance, WS_WRITE_DELAY=5ms",
        ),
        (&[first, second], true, "ws broadcast, two instances"),
    ];
    for (servers, batch, scenario) in runs {
        rows.push(broadcast(servers, &token, &sizes, batch, scenario.into()).await?);
    }
    Ok(rows)
}

/// The connections-held row alone (`--only ws-memory`): memory per idle connection.
pub(super) async fn memory(suite: &Suite) -> anyhow::Result<Row> {
    let n = if suite.quick { 500 } else { held_target() };
    held(&suite.server, &suite.client.token, n).await
}

/// 19,000 where the open-file limit allows it, fewer where it is lower.
fn held_target() -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(20_000);
    limit.saturating_sub(1_000).min(19_000)
}

/// Opens `n` idle connections (each authenticated, answering pings) and holds them while the
/// server's resident memory is read.
async fn held(server: &ServerProc, token: &str, n: usize) -> anyhow::Result<Row> {
    let before = rss_bytes(server.pid())?;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handshakes = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut pending = futures_util::stream::iter((0..n).map(|_| {
        let (base, token) = (server.base.clone(), token.to_string());
        async move {
            let at = Instant::now();
            let ws = connect(&base, &token, false).await;
            (at.elapsed(), ws)
        }
    }))
    .buffer_unordered(OPENING);
    while let Some((took, ws)) = pending.next().await {
        match ws {
            Ok(ws) => {
                handshakes.push(took);
                readers.push(tokio::spawn(idle(ws, stop.clone())));
            }
            Err(err) => {
                errors += 1;
                if errors == 1 {
                    eprintln!("bench: ws connect failed: {err:#}");
                }
            }
        }
    }
    let opened = started.elapsed();
    // Every connection counted by the server, then its memory read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let count = server_connections(server).await?;
        if count as usize >= readers.len() || Instant::now() > deadline {
            break count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(server.pid())?;
    stop.store(true, Ordering::Relaxed);
    for reader in &readers {
        reader.abort();
    }
    let per_connection = after.saturating_sub(before) as f64 / readers.len().max(1) as f64;
    let (p50, p99) = percentiles(&mut handshakes);
    Ok(Row {
        scenario: format!("ws connections held, one instance ({n} asked)"),
        requests: held as u64,
        req_per_sec: readers.len() as f64 / opened.as_secs_f64(),
        p50_ms: ms(p50),
        p99_ms: ms(p99),
        errors,
        ratio_to_baseline: None,
        ratio_to_ceiling: None,
        notes: format!(
            "{held} held at once (the server's cascade_ws_connections); {:.1} KB resident per idle \
             connection (server RSS {:.0} → {:.0} MB; Centrifugo states 30–50 KB); req/s = \
             connections opened per second, latency = upgrade + auth + hello",
            per_connection / 1024.0,
            before as f64 / 1e6,
            after as f64 / 1e6,
        ),
    })
}

/// Reads (and so answers pings) until told to stop.
async fn idle(mut ws: TcpWebSocket, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match ws.next().await {
            Some(frame) if frame.opcode() == OpCode::Close => return,
            Some(_) => {}
            None => return,
        }
    }
}

/// One publisher on `servers[0]`, `sizes.subscribers` spread over `servers` (asking for
/// batches when `batch`), `sizes.rate` messages a second for `sizes.seconds`.
async fn broadcast(
    servers: &[&ServerProc],
    token: &str,
    sizes: &Sizes,
    batch: bool,
    scenario: String,
) -> anyhow::Result<Row> {
    let clock = Instant::now();
    let total = sizes.rate * sizes.seconds;
    // Subscribed (acknowledged: sure to receive the next message) before anything is sent.
    let mut subscribed = Vec::with_capacity(sizes.subscribers);
    let mut opening = futures_util::stream::iter((0..sizes.subscribers).map(|i| {
        let (base, token) = (servers[i % servers.len()].base.clone(), token.to_string());
        async move {
            let mut ws = connect(&base, &token, batch).await?;
            request(
                &mut ws,
                json!({"type": "subscribe", "channel": CHANNEL, "id": "s"}),
            )
            .await?;
            anyhow::Ok(ws)
        }
    }))
    .buffer_unordered(OPENING);
    while let Some(ws) = opening.next().await {
        subscribed.push(ws.context("a subscriber")?);
    }
    drop(opening);
    let delivered = Arc::new(AtomicU64::new(0));
    let subscribers: Vec<_> = subscribed
        .into_iter()
        .map(|ws| {
            let delivered = delivered.clone();
            tokio::spawn(subscriber(ws, total, clock, delivered))
        })
        .collect();

    let mut publisher = connect(&servers[0].base, token, false).await?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / sizes.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        let sent = clock.elapsed().as_micros() as u64;
        let message = json!({"type": "publish", "channel": CHANNEL,
                             "payload": {"n": n, "sent_us": sent}});
        publisher
            .send(Frame::text(message.to_string()))
            .await
            .context("publishing")?;
    }
    let publishing = started.elapsed();
    // Each subscriber stops at the last message or after a quiet spell.
    let mut latencies = Vec::new();
    let (mut missing, mut surplus) = (0u64, 0u64);
    let mut closed = 0u64;
    let mut frames = 0u64;
    for subscriber in subscribers {
        let outcome = subscriber.await.context("a subscriber task")?;
        missing += outcome.tally.missing();
        surplus += outcome.tally.surplus;
        frames += outcome.frames;
        closed += u64::from(outcome.closed);
        latencies.extend(outcome.latencies);
    }
    let elapsed = started.elapsed();
    let deliveries = latencies.len() as u64;
    let (p50, p99) = percentiles(&mut latencies);
    Ok(Row {
        scenario,
        requests: deliveries,
        req_per_sec: deliveries as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(p50),
        p99_ms: ms(p99),
        errors: missing + surplus,
        ratio_to_baseline: None,
        ratio_to_ceiling: None,
        notes: format!(
            "{} subscribers of `{CHANNEL}` on {} instance(s); {total} messages published at \
             {:.0}/s (asked {}/s); {}; req/s = messages delivered per second, latency = \
             publish to delivery; errors = deliveries missing ({missing}) or surplus ({surplus}: \
             a message twice, or one never published) ({closed} subscribers closed by the \
             server)",
            sizes.subscribers,
            servers.len(),
            total as f64 / publishing.as_secs_f64(),
            sizes.rate,
            if batch {
                format!(
                    "batches asked: {:.2} messages per frame",
                    deliveries as f64 / frames.max(1) as f64
                )
            } else {
                "one message per frame".to_string()
            },
        ),
    })
}

struct Received {
    tally: Tally,
    /// Text frames that carried messages (fewer than the messages with batches).
    frames: u64,
    /// Publish to delivery, of each message's first delivery.
    latencies: Vec<Duration>,
    closed: bool,
}

/// Which of the `total` messages (numbered from 0) a subscriber got: each counts once, and
/// one received again (or numbered past the last) is a surplus, an error as much as a
/// missing one (a count of deliveries alone would let duplicates make up for losses).
struct Tally {
    seen: Vec<bool>,
    /// Distinct messages received.
    received: u64,
    surplus: u64,
}

impl Tally {
    fn new(total: u64) -> Tally {
        Tally {
            seen: vec![false; total as usize],
            received: 0,
            surplus: 0,
        }
    }

    /// Counts message `n`; true the first time.
    fn count(&mut self, n: u64) -> bool {
        match self.seen.get_mut(n as usize) {
            Some(seen) if !*seen => {
                *seen = true;
                self.received += 1;
                true
            }
            _ => {
                self.surplus += 1;
                false
            }
        }
    }

    fn missing(&self) -> u64 {
        self.seen.len() as u64 - self.received
    }
}

/// Reads until all `total` messages arrived, the server closed, or nothing came for 5 s.
async fn subscriber(
    mut ws: TcpWebSocket,
    total: u64,
    clock: Instant,
    delivered: Arc<AtomicU64>,
) -> Received {
    let mut out = Received {
        tally: Tally::new(total),
        frames: 0,
        latencies: Vec::with_capacity(total as usize),
        closed: false,
    };
    while out.tally.received < total {
        let frame = match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        match frame.opcode() {
            OpCode::Text => {
                let now = clock.elapsed().as_micros() as u64;
                // A `message`, or a `batch` of them: each carries its number and send time.
                let mut messages = 0;
                for (n, sent) in numbered(frame.payload()) {
                    messages += 1;
                    if out.tally.count(n) {
                        out.latencies
                            .push(Duration::from_micros(now.saturating_sub(sent)));
                    }
                }
                if messages > 0 {
                    out.frames += 1;
                    delivered.fetch_add(messages, Ordering::Relaxed);
                }
            }
            OpCode::Close => {
                out.closed = true;
                break;
            }
            _ => {}
        }
    }
    out
}

/// The `n` and `sent_us` of each message of a `message` or `batch` frame, in order, read
/// without parsing the whole JSON (the payloads are the publisher's, `{"n":…,"sent_us":…}`,
/// so each key appears once per message, `n` first).
fn numbered(payload: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut rest = payload;
    std::iter::from_fn(move || {
        let n = number_after(&mut rest, b"\"n\":")?;
        let sent = number_after(&mut rest, b"\"sent_us\":")?;
        Some((n, sent))
    })
}

/// The number after the next `key` in `rest`, moving `rest` past it.
fn number_after(rest: &mut &[u8], key: &[u8]) -> Option<u64> {
    let at = rest.windows(key.len()).position(|w| w == key)? + key.len();
    *rest = &rest[at..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let number = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok();
    *rest = &rest[digits..];
    number
}

/// An authenticated connection (asking for batches when `batch`), past the server's `hello`.
async fn connect(base: &str, token: &str, batch: bool) -> anyhow::Result<TcpWebSocket> {
    let query = if batch { "?batch=1" } else { "" };
    let url = format!("{}/ws{query}", base.replacen("http", "ws", 1));
    let request = HttpRequestBuilder::new().header("Authorization", format!("Bearer {token}"));
    let mut ws = WebSocket::connect(url.parse().context("the /ws address")?)
        .with_request(request)
        .await
        .map_err(|e| anyhow::anyhow!("WebSocket upgrade: {e:?}"))?;
    let hello = next_json(&mut ws).await?;
    ensure!(hello["type"] == "hello", "no hello: {hello}");
    ensure!(
        !batch || hello["batch"] == true,
        "the server did not take ?batch=1: {hello}"
    );
    Ok(ws)
}

/// Sends `message` and waits for its `ack`; an `unavailable` answer (Redis did not answer in
/// time: on a loaded machine it happens) is retried, as the protocol asks, for up to 10 s.
async fn request(ws: &mut TcpWebSocket, message: Value) -> anyhow::Result<()> {
    for _ in 0..100 {
        ws.send(Frame::text(message.to_string())).await?;
        let answer = next_json(ws).await?;
        if answer["type"] == "ack" {
            return Ok(());
        }
        if answer["code"] != "unavailable" {
            bail!("{message} was answered {answer}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{message} was answered `unavailable` for 10 s")
}

async fn next_json(ws: &mut TcpWebSocket) -> anyhow::Result<Value> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no answer within 10 s")?
            .context("the connection ended")?;
        match frame.opcode() {
            OpCode::Text => return Ok(serde_json::from_slice(frame.payload())?),
            OpCode::Close => bail!("closed by the server"),
            _ => {}
        }
    }
}

/// The resident set of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The server's own count of open WebSocket connections.
async fn server_connections(server: &ServerProc) -> anyhow::Result<f64> {
    let client = super::client::Client::new(&server.base)?;
    client.metric(cascade_core::metrics::WS_CONNECTIONS).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_send_times_are_read_from_a_message_or_a_batch() {
        let frame = br#"{"type":"message","channel":"c","offset":3,"epoch":"e","time":1,"payload":{"n":2,"sent_us":12345}}"#;
        assert_eq!(numbered(frame).collect::<Vec<_>>(), [(2, 12345)]);
        assert_eq!(numbered(br#"{"type":"ack"}"#).count(), 0);
        let batch = br#"{"type":"batch","messages":[{"type":"message","payload":{"n":1,"sent_us":7}},{"type":"message","payload":{"n":2,"sent_us":9}}]}"#;
        assert_eq!(numbered(batch).collect::<Vec<_>>(), [(1, 7), (2, 9)]);
    }

    #[test]
    fn a_message_twice_does_not_make_up_for_a_missing_one() {
        let mut tally = Tally::new(3);
        for n in [0, 1, 1, 7] {
            tally.count(n);
        }
        assert_eq!(tally.received, 2);
        assert_eq!(tally.missing(), 1);
        assert_eq!(tally.surplus, 2);
    }
}
