//! The accept loop: every connection has deadlines, and their number a cap.
//!
//! `axum::serve` reads request heads without a deadline and keeps an idle keep-alive connection
//! for ever, with no bound on how many are open (PITFALLS 18): a client trickling one header
//! line at a time, or many idle connections, hold sockets and file descriptors indefinitely.
//! Here each connection is served by hyper's HTTP/1 connection under a watchdog that enforces
//! the two deadlines Go's `http.Server` calls `ReadHeaderTimeout` and `IdleTimeout`:
//!
//! - `HEADER_READ_TIMEOUT`: a request head (request line and headers) must be complete within
//!   it, counted from the connection's opening, or on a keep-alive connection from the first
//!   byte of the next request;
//! - `IDLE_TIMEOUT`: a connection with no request in flight and no byte moving either way is
//!   closed after it (a client that stops reading a response counts as idle too).
//!
//! hyper's own `header_read_timeout` is not used: its clock starts when hyper begins waiting
//! for a head, and on a keep-alive connection that wait *is* the idle time (hyper 1.x,
//! `proto/h1/conn.rs`, `poll_read_head`), so it would close every idle connection after
//! `HEADER_READ_TIMEOUT` and `IDLE_TIMEOUT` could not be longer.
//!
//! At `MAX_CONNECTIONS` open connections the loop stops accepting: a new connection waits in the
//! kernel's accept backlog (the listen queue; tokio's `TcpListener::bind` asks for 1024) and is
//! served as soon as one closes; past the backlog the kernel drops connection attempts and
//! clients retry. Waiting rather than refusing: a burst past the cap is served late instead of
//! failing, and nothing is accepted only to be closed. A request waiting there has not started,
//! so no deadline of ours runs for it; the client's own does.
//!
//! The request's handler is bounded by `REQUEST_TIMEOUT` (the timeout layer), not here.
//!
//! HTTP/1 only, as before (axum's `http1` feature), with upgrades (`GET /ws`): once a
//! connection is upgraded, hyper hands its socket to the WebSocket's own task and the
//! connection's future ends here, so its watchdog stops and its `MAX_CONNECTIONS` place is
//! freed; WebSockets are capped by `WS_MAX_CONNECTIONS` instead and have their own heartbeat,
//! idle deadline and shutdown (the real-time module's). Because hyper-util's `GracefulShutdown`
//! cannot watch an upgradeable connection, the drain is ours: each connection is told to shut
//! down gracefully (idle ones close at once) and the drain waits for every place to be free.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use cascade_core::config::HttpConfig;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::http::App;

/// The two deadlines of a connection.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    header: Duration,
    idle: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, with the connection deadlines and cap
/// of `http`; then stops accepting, lets in-flight requests finish for at most
/// `SHUTDOWN_TIMEOUT` (idle connections close at once), and returns.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
    http: &HttpConfig,
) -> io::Result<()> {
    let deadlines = Deadlines {
        header: http.header_read_timeout,
        idle: http.idle_timeout,
    };
    warn_if_above_open_file_limit(http.max_connections);
    let places = Arc::new(Semaphore::new(http.max_connections));
    let (draining, drain_signal) = watch::channel(false);
    let mut builder = http1::Builder::new();
    // Explicitly off (our watchdog keeps the deadlines; see the module's doc). Left at its
    // default, hyper would warn on every connection that it has no timer.
    builder.header_read_timeout(None);
    tokio::pin!(shutdown);

    loop {
        // Never closed, so acquiring fails only if it were: then stop as on shutdown.
        let place = tokio::select! {
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // The application with the peer's address (`ConnectInfo`, which the rate limiter reads).
        let router = app.for_peer(peer);
        let activity = Arc::new(Activity::default());
        let service = hyper::service::service_fn({
            let activity = activity.clone();
            move |request: hyper::Request<Incoming>| {
                let in_flight = activity.request_begins();
                let response = router.clone().oneshot(request.map(Body::new));
                async move {
                    let response = response.await;
                    drop(in_flight);
                    response
                }
            }
        });
        let socket = TokioIo::new(Tracked {
            inner: stream,
            activity: activity.clone(),
        });
        let connection = builder.serve_connection(socket, service).with_upgrades();
        let mut drain = drain_signal.clone();
        tokio::spawn(async move {
            let _place = place;
            let watchdog = activity.watchdog(deadlines);
            tokio::pin!(connection, watchdog);
            let mut told = false;
            loop {
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(err) = ended {
                            tracing::debug!(%peer, error = %err, "connection ended with an error");
                        }
                        break;
                    }
                    why = &mut watchdog => {
                        tracing::debug!(%peer, why, "connection closed");
                        break;
                    }
                    _ = drain.wait_for(|d| *d), if !told => {
                        told = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }

    tracing::info!("shutdown requested: draining in-flight requests");
    drop(listener);
    let drain_timeout = http.shutdown_timeout;
    let _ = draining.send(true);
    let all = u32::try_from(http.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain_timeout, places.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "in-flight requests did not finish in time; stopping anyway"
        );
    }
    Ok(())
}

/// Each connection is a file descriptor: a cap above the process's limit would never be
/// reached, `accept` failing first (EMFILE) and the pool and Redis with it.
fn warn_if_above_open_file_limit(max_connections: usize) {
    let soft_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        });
    if let Some(limit) = soft_limit
        && max_connections >= limit
    {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "MAX_CONNECTIONS is not below the open-file limit: connections past it fail to be \
             accepted; raise `ulimit -n` or lower MAX_CONNECTIONS"
        );
    }
}

/// A failed `accept`: the peer gave up before we took it (go on), or the process is out of
/// file descriptors or memory (wait a second rather than spin; connections wait meanwhile).
async fn accept_failed(err: io::Error) {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %err, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What a connection's watchdog reads, written by its socket and its service: counters only.
/// Bytes move and requests begin and end many times per request; the watchdog looks a few
/// times per deadline. So the hot side only bumps counters (no clock read, no lock: it was
/// both, once per read, write, request start and end), and the watchdog turns changes it sees
/// into times on its own ticks (see [`Watch`]).
///
/// Atomics only because the type must be `Sync` to be shared: the socket, the service and the
/// watchdog all run in the connection's one task, so `Relaxed` suffices (nothing else is
/// published through these values).
#[derive(Debug, Default)]
struct Activity {
    /// Requests whose head hyper parsed and whose handler has not answered yet: while there is
    /// one, no deadline of ours runs (`REQUEST_TIMEOUT` bounds the handler).
    in_flight: AtomicUsize,
    /// Reads that brought bytes, and writes that sent some.
    reads: AtomicU64,
    writes: AtomicU64,
    /// Requests begun, and ended (answered or abandoned).
    begun: AtomicU64,
    ended: AtomicU64,
    /// `reads` when the last request ended: more reads since are the next head arriving.
    reads_at_end: AtomicU64,
}

impl Activity {
    fn bytes_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    fn bytes_written(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// hyper parsed a head: the request is in flight until the guard is dropped.
    fn request_begins(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.begun.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn counts(&self) -> Counts {
        Counts {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            begun: self.begun.load(Ordering::Relaxed),
            ended: self.ended.load(Ordering::Relaxed),
        }
    }

    /// Resolves when a deadline passes. Ticks eight times per the shorter deadline: a change is
    /// dated by the tick that sees it (at most one tick late) and a deadline noticed at most
    /// one tick after it passes, so a connection is closed at most a quarter late, never early.
    async fn watchdog(&self, deadlines: Deadlines) -> &'static str {
        let period = (deadlines.header.min(deadlines.idle) / 8).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = Watch::new(Instant::now());
        loop {
            tick.tick().await;
            if let Some(why) = watch.expired(self, deadlines, Instant::now()) {
                return why;
            }
        }
    }
}

/// A snapshot of an [`Activity`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    reads: u64,
    writes: u64,
    begun: u64,
    ended: u64,
}

/// The watchdog's view of a connection: what it saw of the counters at its last look, and the
/// times it dated from them.
#[derive(Debug)]
struct Watch {
    seen: Counts,
    /// Since when a request head has been arriving: the connection's opening for the first
    /// one, then the look that first saw bytes read while nothing was in flight. `None`
    /// between requests.
    head_since: Option<Instant>,
    /// The look that last saw bytes move or a request end (or the opening).
    last_activity: Instant,
}

impl Watch {
    fn new(opened: Instant) -> Watch {
        Watch {
            seen: Counts {
                reads: 0,
                writes: 0,
                begun: 0,
                ended: 0,
            },
            head_since: Some(opened),
            last_activity: opened,
        }
    }

    /// Which deadline has passed at `now`, if one has, after dating what changed since the
    /// last look at `now`.
    fn expired(
        &mut self,
        activity: &Activity,
        deadlines: Deadlines,
        now: Instant,
    ) -> Option<&'static str> {
        let counts = activity.counts();
        if counts != self.seen {
            self.last_activity = now;
        }
        if counts.begun != self.seen.begun || counts.ended != self.seen.ended {
            // A request began (its head is complete) or ended since the last look.
            self.head_since = None;
        }
        self.seen = counts;
        if activity.in_flight.load(Ordering::Relaxed) > 0 {
            self.last_activity = now;
            return None;
        }
        if self.head_since.is_none() && counts.reads > activity.reads_at_end.load(Ordering::Relaxed)
        {
            self.head_since = Some(now);
        }
        if let Some(since) = self.head_since {
            (now.saturating_duration_since(since) >= deadlines.header)
                .then_some("no complete request head within HEADER_READ_TIMEOUT")
        } else {
            (now.saturating_duration_since(self.last_activity) >= deadlines.idle)
                .then_some("idle for IDLE_TIMEOUT")
        }
    }
}

/// A request in flight; its end (the handler's answer, or the request being abandoned) starts
/// the idle clock.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let reads = activity.reads.load(Ordering::Relaxed);
        activity.reads_at_end.store(reads, Ordering::Relaxed);
        activity.ended.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that tells its [`Activity`] when bytes move.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.bytes_written();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.bytes_written();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINES: Deadlines = Deadlines {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    /// A connection opened now, its watchdog's view, and its opening time.
    fn opened() -> (Arc<Activity>, Watch, Instant) {
        let opened = Instant::now();
        (Arc::new(Activity::default()), Watch::new(opened), opened)
    }

    #[test]
    fn a_new_connection_must_send_its_head_within_the_header_deadline() {
        let (activity, mut watch, opened) = opened();
        let at = |s| opened + Duration::from_secs(s);
        assert_eq!(watch.expired(&activity, DEADLINES, at(9)), None);
        // Trickled bytes do not move the deadline.
        activity.bytes_read();
        assert_eq!(watch.expired(&activity, DEADLINES, at(9)), None);
        assert!(watch.expired(&activity, DEADLINES, at(10)).is_some());
    }

    #[test]
    fn between_requests_the_idle_deadline_runs_until_the_next_head_begins() {
        let (activity, mut watch, opened) = opened();
        let at = |s| opened + Duration::from_secs(s);
        activity.bytes_read();
        let in_flight = activity.request_begins();
        assert_eq!(
            watch.expired(&activity, DEADLINES, at(3600)),
            None,
            "no deadline while a request is in flight"
        );
        activity.bytes_written();
        drop(in_flight);
        // The end is dated by the look that sees it.
        assert_eq!(watch.expired(&activity, DEADLINES, at(4000)), None);
        assert_eq!(watch.expired(&activity, DEADLINES, at(4059)), None);
        assert_eq!(
            watch.expired(&activity, DEADLINES, at(4060)),
            Some("idle for IDLE_TIMEOUT")
        );
        // Bytes of a next head: the header deadline runs from the look that saw them.
        activity.bytes_read();
        assert_eq!(watch.expired(&activity, DEADLINES, at(4061)), None);
        assert_eq!(watch.expired(&activity, DEADLINES, at(4070)), None);
        assert_eq!(
            watch.expired(&activity, DEADLINES, at(4071)),
            Some("no complete request head within HEADER_READ_TIMEOUT")
        );
    }

    #[test]
    fn a_request_that_began_and_ended_between_two_looks_ends_the_head_deadline() {
        let (activity, mut watch, opened) = opened();
        let at = |s| opened + Duration::from_secs(s);
        activity.bytes_read();
        drop(activity.request_begins());
        activity.bytes_written();
        assert_eq!(
            watch.expired(&activity, DEADLINES, at(11)),
            None,
            "the head came in time; the idle clock runs from this look"
        );
        assert_eq!(
            watch.expired(&activity, DEADLINES, at(71)),
            Some("idle for IDLE_TIMEOUT")
        );
    }
}
