//! The outermost layer: everything a request gets on its way in and out, in one future.
//!
//! Request id, the request's span, the request metrics and the JSON error shape used to be four
//! layers (tower-http's `SetRequestId`/`PropagateRequestId` and `Trace`, two `from_fn`
//! middlewares). Each `from_fn` clones the whole stack below it and boxes a future per request,
//! and the request id was a UUID v4 (a `getrandom` system call per request). Here they cost
//! what they must (issue 13):
//!
//! - the request id is this process's random prefix and a counter, no system call;
//! - the span is created only when its level is enabled (`RUST_LOG`), and costs nothing else;
//! - the metrics handles of each (method, route, status) are resolved once per worker thread
//!   and kept, so a request allocates no label and takes no registry lock;
//! - an error response not already JSON is rebuilt in the JSON error shape on the way out.
//!
//! The rate-limit headers' slot is inserted only where a limit can apply: requests with
//! credentials and every method but `GET`/`HEAD`/`OPTIONS` (`cascade_http::auth::enforce`);
//! so is the peer's address (`ConnectInfo`), which only the limits and the sessions read.
//!
//! The edge wraps the whole router once ([`App`]), not each route: `Router::layer` layers
//! every route's service, and axum then clones that layered service and boxes its future
//! per request, on top of the route's own. The route label of the metrics, which the router
//! would give as `MatchedPath`, comes from the edge's own table of the router's path
//! templates ([`RouteTable`]): the OpenAPI document's paths, which a test keeps equal to the
//! router's, and the benchmark's extra routes.
//!
//! The hottest `GET` routes go past the router altogether ([`FastRoute`], declared by their
//! module): the walk of that table that labels the metrics also finds the route's handler and
//! its path parameter, and the edge calls it with the parameter as a `&str`. Axum's routing
//! (a second walk, the parameter percent-decoded into `Arc<str>`s, its `Vec`, an extension
//! box and map) and its two boxed futures are skipped; the edge sets the `Content-Length`
//! axum's route would. Everything else goes through the router: other methods (`HEAD`'s
//! bodiless answer and 405 stay axum's), a parameter with a `%` (decoding is axum's), a request
//! with a body or credentials (the body limit, the rate-limit slot), and whatever the handler
//! hands back. A fast handler sees the request's headers as the client sent them (no
//! `x-request-id` of ours: it reads none). `tests/fast_routes.rs` compares its answers with
//! the router's.
//!
//! The edge also holds what the layers below it used to do for every request, and pays for
//! each only where it can matter (issue 13; `bench/callgrind.sh` counted each):
//!
//! - compression (tower-http's) wraps only requests that send `Accept-Encoding`. A request
//!   without it gets its response as it is, with the `Vary: accept-encoding` compression would
//!   have added, so shared caches keep telling the two kinds of clients apart;
//! - the body limit is set only on requests that have a body (none has nothing to limit);
//! - `REQUEST_TIMEOUT`: a timer is armed only when the handler does not answer on its first
//!   poll (tower-http's timeout registered one in the runtime's timer wheel per request, before
//!   even polling the handler). Same deadline, from the request's arrival, same 504.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::BoxError;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::http::{HeaderValue, Method, Response, StatusCode, header};
use cascade_core::metrics as m;
use cascade_http::auth::RateSlot;
use cascade_http::fast::{FastFuture, FastHandler, FastRoute};
use metrics::{Counter, Histogram};
use tower::{Layer, Service};
use tower_http::compression::{Compression, CompressionLayer, Predicate};

use super::middleware::{REQUEST_ID, json_errors};

/// Longest `x-request-id` a client may choose; a longer one is replaced by ours (it would be
/// copied into every log line of the request).
const MAX_CLIENT_REQUEST_ID: usize = 128;

/// The route label of requests that matched no route, so scanners cannot mint one series
/// per path.
const UNMATCHED: &str = "unmatched";

/// The router's path templates (`/listings/{version_id}`), each one `Arc` the metrics'
/// per-thread handles are keyed by (see [`record`]), and the routes the edge serves itself
/// ([`FastRoute`]).
#[derive(Default)]
pub struct RouteTable {
    table: matchit::Router<RouteEntry>,
    /// The templates, in the order given (for [`RouteTable::routed_only`]).
    templates: Vec<Arc<str>>,
    /// Those served past the router.
    fast: Vec<Arc<str>>,
}

struct RouteEntry {
    template: Arc<str>,
    fast: Option<FastHandler>,
}

impl RouteTable {
    /// The table of `templates`, with the handlers of `fast` routes among them. A fast route
    /// whose template is not one of the router's is left out: the router would not answer
    /// its other methods.
    pub fn new<'a>(
        templates: impl IntoIterator<Item = &'a str>,
        fast: impl IntoIterator<Item = FastRoute>,
    ) -> RouteTable {
        let mut fast: Vec<FastRoute> = fast.into_iter().collect();
        let mut table = matchit::Router::new();
        let (mut kept, mut served) = (Vec::new(), Vec::new());
        for template in templates {
            let handler = fast
                .iter()
                .position(|f| f.template == template)
                .map(|i| fast.swap_remove(i).handler);
            let entry = RouteEntry {
                template: Arc::from(template),
                fast: handler,
            };
            let (name, is_fast) = (entry.template.clone(), entry.fast.is_some());
            // The router refused conflicting routes already; a template twice is harmless.
            match table.insert(template, entry) {
                Ok(()) => {
                    if is_fast {
                        served.push(name.clone());
                    }
                    kept.push(name)
                }
                Err(err) => {
                    tracing::debug!(template, error = %err, "route template not added to the table")
                }
            }
        }
        for route in fast {
            tracing::warn!(
                template = route.template,
                "a fast route that is not one of the router's is not served"
            );
        }
        RouteTable {
            table,
            templates: kept,
            fast: served,
        }
    }

    /// The same templates, every request left to the router.
    fn routed_only(&self) -> RouteTable {
        RouteTable::new(self.templates.iter().map(|t| &**t), [])
    }

    /// The template `path` matches, as the router would match it.
    #[cfg(test)]
    fn at(&self, path: &str) -> Option<Arc<str>> {
        self.table.at(path).ok().map(|m| m.value.template.clone())
    }
}

/// The edge, with the request deadline (`REQUEST_TIMEOUT`) and body limit
/// (`BODY_LIMIT_BYTES`) it enforces and the route table it labels metrics by.
#[derive(Clone)]
pub struct EdgeLayer {
    timeout: Duration,
    body_limit: DefaultBodyLimit,
    routes: Arc<RouteTable>,
}

impl EdgeLayer {
    pub fn new(timeout: Duration, body_limit_bytes: usize, routes: RouteTable) -> EdgeLayer {
        EdgeLayer {
            timeout,
            body_limit: DefaultBodyLimit::max(body_limit_bytes),
            routes: Arc::new(routes),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner: CompressionLayer::new()
                .compress_when(Compressible)
                .layer(inner),
            timeout: self.timeout,
            body_limit: self.body_limit,
            routes: self.routes.clone(),
            peer: None,
        }
    }
}

/// The whole application: the router behind the edge. Cloned per request (two `Arc`s).
pub type App = Edge<Router>;

impl App {
    /// The same application with every request left to the router: what the fast routes'
    /// answers are compared with (tests).
    pub fn routed_only(&self) -> App {
        let mut app = self.clone();
        app.routes = Arc::new(self.routes.routed_only());
        app
    }

    /// The templates of the routes whose `GET`s this application serves past the router.
    pub fn fast_routes(&self) -> impl Iterator<Item = &str> {
        self.routes.fast.iter().map(|t| &**t)
    }

    /// This application for the connection from `peer`, which requests a limit can apply to
    /// are given as `ConnectInfo`.
    pub fn for_peer(&self, peer: SocketAddr) -> App {
        let mut app = self.clone();
        app.peer = Some(peer);
        app
    }
}

/// The router's own rendering: its route table (the OpenAPI test reads the paths from it).
impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.get_ref().fmt(f)
    }
}

/// The service inside is reached through compression or, for a request that does not ask for
/// it, directly (`Compression::get_mut`): one copy of it, no clone per request.
#[derive(Clone)]
pub struct Edge<S> {
    inner: Compression<S, Compressible>,
    timeout: Duration,
    body_limit: DefaultBodyLimit,
    routes: Arc<RouteTable>,
    peer: Option<SocketAddr>,
}

impl<S, B> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response<B>, Error = Infallible>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future, CompressedFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        // A client's own id is kept, when it is short enough to log with every line.
        let client_id = request
            .headers()
            .get(&REQUEST_ID)
            .filter(|id| id.len() <= MAX_CLIENT_REQUEST_ID);
        let (id, ours) = match client_id {
            Some(id) => (id.clone(), false),
            None => (next_request_id(), true),
        };
        let limited = may_be_limited(&request);
        let method = method_label(request.method());
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %id.to_str().unwrap_or("-"),
        );
        let matched = self.routes.table.at(request.uri().path()).ok();
        let route = matched.as_ref().map(|m| m.value.template.clone());
        // A fast route's `GET` is answered from this walk of the templates, past the router
        // (http/fast.rs in cascade-http); the handler can hand it back (`None`).
        let fast = matched
            .and_then(|m| Some((m.value.fast.as_ref()?, m.params.iter().next()?.1)))
            .filter(|(_, param)| {
                request.method() == Method::GET
                    && !limited
                    && !param.contains('%')
                    && request.body().is_end_stream()
            })
            .and_then(|(handler, param)| span.in_scope(|| handler(param, request.headers())));
        let (inner, rate_slot) = if let Some(answer) = fast {
            // Not given the request id: a fast handler reads no header of ours.
            if request.headers().contains_key(header::ACCEPT_ENCODING) {
                let mut compression = CompressionLayer::new()
                    .compress_when(Compressible)
                    .layer(Answer(Some(answer)));
                let future = compression.call(request);
                (Inner::FastCompressed { future }, None)
            } else {
                let future = Answered(Some(answer));
                (Inner::FastPlain { future }, None)
            }
        } else {
            if ours {
                request.headers_mut().insert(REQUEST_ID, id.clone());
            }
            let rate_slot = limited.then(|| {
                if let Some(peer) = self.peer {
                    request.extensions_mut().insert(ConnectInfo(peer));
                }
                RateSlot::attach(request.extensions_mut())
            });
            if !request.body().is_end_stream() {
                self.body_limit.apply(&mut request);
            }
            let inner = span.in_scope(|| {
                if request.headers().contains_key(header::ACCEPT_ENCODING) {
                    Inner::Compressed {
                        future: self.inner.call(request),
                    }
                } else {
                    Inner::Plain {
                        future: self.inner.get_mut().call(request),
                    }
                }
            });
            (inner, rate_slot)
        };
        EdgeFuture {
            inner,
            span,
            started,
            timeout: self.timeout,
            deadline: None,
            id: Some(id),
            rate_slot,
            method,
            route,
        }
    }
}

type CompressedFuture<F> = tower_http::compression::ResponseFuture<F, Compressible>;

/// A response body the edge turns into axum's `Body`.
pub trait EdgeBody: HttpBody<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<T> EdgeBody for T
where
    T: HttpBody<Data = Bytes> + Send + 'static,
    T::Error: Into<BoxError>,
{
}

pin_project_lite::pin_project! {
    /// The handler's future, through compression or not, behind the router or not.
    #[project = InnerProj]
    pub enum Inner<P, C> {
        Plain { #[pin] future: P },
        Compressed { #[pin] future: C },
        FastPlain { future: Answered },
        FastCompressed { #[pin] future: CompressedFuture<Answered> },
    }
}

impl<P, C, B, CB> Inner<P, C>
where
    P: Future<Output = Result<Response<B>, Infallible>>,
    C: Future<Output = Result<Response<CB>, Infallible>>,
    B: EdgeBody,
    CB: EdgeBody,
{
    /// The response in the JSON error shape when it is an error.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        match self.project() {
            InnerProj::Plain { future } => future.poll(cx).map(|Ok(response)| plain(response)),
            InnerProj::Compressed { future } => {
                future.poll(cx).map(|Ok(response)| json_errors(response))
            }
            InnerProj::FastPlain { future } => Pin::new(future)
                .poll(cx)
                .map(|Ok(response)| plain(response)),
            InnerProj::FastCompressed { future } => {
                future.poll(cx).map(|Ok(response)| json_errors(response))
            }
        }
    }
}

/// A response to a client that did not ask for compression, as the edge sends it.
fn plain<B: EdgeBody>(mut response: Response<B>) -> Response<Body> {
    vary_as_compression_would(&mut response);
    json_errors(response)
}

/// A fast route's answer as a service, for compression to wrap: called once.
struct Answer(Option<FastFuture>);

impl Service<Request> for Answer {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answered;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> Answered {
        Answered(self.0.take())
    }
}

/// A fast route's answer as the router would have given it: with the `Content-Length` axum
/// sets on every response whose body's length is known.
pub struct Answered(Option<FastFuture>);

impl Future for Answered {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(future) = self.0.as_mut() else {
            // `Answer` is called once; a second call has nothing to answer with.
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return Poll::Ready(Ok(response));
        };
        future.as_mut().poll(cx).map(|mut response| {
            set_content_length(&mut response);
            Ok(response)
        })
    }
}

/// What axum's route does to every response (`set_content_length` in axum's `route.rs`):
/// `Content-Length` from the body's exact size, unless the handler set one.
fn set_content_length(response: &mut Response<Body>) {
    if response.headers().contains_key(header::CONTENT_LENGTH) {
        return;
    }
    if let Some(size) = response.body().size_hint().exact() {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
}

/// Requests a rate limit can apply to: authenticated calls, and the unauthenticated writes
/// (registration, login, refresh). Public reads are neither.
fn may_be_limited(request: &Request) -> bool {
    !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) || request.headers().contains_key(header::AUTHORIZATION)
}

pin_project_lite::pin_project! {
    pub struct EdgeFuture<P, C> {
        #[pin]
        inner: Inner<P, C>,
        span: tracing::Span,
        started: Instant,
        timeout: Duration,
        // `REQUEST_TIMEOUT` from `started`, armed once the handler first waits.
        #[pin]
        deadline: Option<tokio::time::Sleep>,
        id: Option<HeaderValue>,
        rate_slot: Option<RateSlot>,
        method: &'static str,
        route: Option<Arc<str>>,
    }
}

impl<P, C, B, CB> Future for EdgeFuture<P, C>
where
    P: Future<Output = Result<Response<B>, Infallible>>,
    C: Future<Output = Result<Response<CB>, Infallible>>,
    B: EdgeBody,
    CB: EdgeBody,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        // A handler that panics answers 500 in the JSON error shape, and the connection lives
        // on. Unwinding is caught here rather than by a layer of its own: that layer boxed
        // every response body.
        let inner = this.inner;
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx)));
        let mut response = match polled {
            Ok(Poll::Ready(response)) => response,
            Ok(Poll::Pending) => {
                if this.deadline.is_none() {
                    let at = *this.started + *this.timeout;
                    this.deadline.set(Some(tokio::time::sleep_until(at.into())));
                }
                match this.deadline.as_pin_mut().map(|d| d.poll(cx)) {
                    Some(Poll::Ready(())) => timed_out(),
                    _ => return Poll::Pending,
                }
            }
            Err(panic) => panicked(panic.as_ref()),
        };
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(REQUEST_ID, id);
        }
        if let Some(slot) = this.rate_slot.take() {
            slot.report(&mut response);
        }
        let status = response.status();
        let elapsed = this.started.elapsed();
        let route = this.route.as_deref().unwrap_or(UNMATCHED);
        record(this.method, route, status.as_u16(), elapsed.as_secs_f64());
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), latency = ?elapsed, "response failed");
        } else {
            tracing::debug!(status = status.as_u16(), latency = ?elapsed, "finished processing request");
        }
        Poll::Ready(Ok(response))
    }
}

/// Which responses the compression layer compresses (for clients that ask): what
/// tower-http's default predicate compresses (bodies of 32 bytes or more, except images,
/// gRPC and event streams), read from one header lookup instead of three.
#[derive(Debug, Clone, Copy)]
pub struct Compressible;

impl Predicate for Compressible {
    fn should_compress<B: HttpBody>(&self, response: &Response<B>) -> bool {
        let headers = response.headers();
        compressible(
            headers.get(header::CONTENT_LENGTH),
            response.body(),
            headers.get(header::CONTENT_TYPE),
        )
    }
}

fn compressible<B: HttpBody>(
    length: Option<&HeaderValue>,
    body: &B,
    kind: Option<&HeaderValue>,
) -> bool {
    let big_enough = match length {
        Some(length) => length
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l >= 32),
        None => body.size_hint().exact().is_none_or(|l| l >= 32),
    };
    let kind = kind.map_or(&b""[..], HeaderValue::as_bytes);
    big_enough
        && !kind.starts_with(b"image/")
        && !kind.starts_with(b"application/grpc")
        && !kind.starts_with(b"text/event-stream")
}

/// What tower-http's compression adds to a response it leaves uncompressed because the client
/// did not ask: `Vary: accept-encoding` when it would have compressed it for a client that
/// did (and nothing says so already). One pass over the response's few headers.
fn vary_as_compression_would<B: HttpBody>(response: &mut Response<B>) {
    let (mut length, mut kind) = (None, None);
    for (name, value) in response.headers() {
        if *name == header::CONTENT_ENCODING
            || *name == header::CONTENT_RANGE
            || (*name == header::VARY && names_accept_encoding(value.as_bytes()))
        {
            return;
        }
        if *name == header::CONTENT_LENGTH && length.is_none() {
            length = Some(value);
        } else if *name == header::CONTENT_TYPE && kind.is_none() {
            kind = Some(value);
        }
    }
    if compressible(length, response.body(), kind) {
        response
            .headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Whether a `Vary` value names `accept-encoding` (any case), as tower-http tests it.
fn names_accept_encoding(value: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"accept-encoding";
    value
        .windows(NEEDLE.len())
        .any(|w| w.eq_ignore_ascii_case(NEEDLE))
}

/// The answer of a request still running at `REQUEST_TIMEOUT` (its handler is dropped with
/// this future).
fn timed_out() -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    json_errors(response)
}

/// The answer of a request whose handler panicked.
fn panicked(panic: &(dyn std::any::Any + Send)) -> Response<Body> {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(panic = message, "a request handler panicked");
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    json_errors(response)
}

/// `<16 hex digits: this process><16 hex digits: a counter>`: unique across processes (the
/// prefix is drawn from the OS's generator once) and as long as the UUIDs it replaces.
fn next_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = [0u8; 32];
    hex(prefix, &mut text[..16]);
    hex(n, &mut text[16..]);
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("-"))
}

fn hex(mut n: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// The counter and histogram of one (method, route, status).
struct Handles {
    method: &'static str,
    route: Box<str>,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

/// Hashes the address of a route's text: the route table hands every request of a route a
/// clone of the same `Arc<str>`, so its address names the route without hashing the text. An
/// address reused by another table's route after the first was dropped is told apart by the
/// text each entry keeps.
#[derive(Default)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ByAddress = HashMap<usize, Vec<Handles>, BuildHasherDefault<AddressHasher>>;

thread_local! {
    /// Handles by the route text's address, resolved in the registry once per thread.
    /// Bounded: routes are templates, methods are labelled from a fixed list, statuses few.
    static HANDLES: RefCell<ByAddress> = RefCell::default();
}

/// Counts a request and its latency by method, route template and final status.
fn record(method: &'static str, route: &str, status: u16, seconds: f64) {
    HANDLES.with_borrow_mut(|routes| {
        let handles = routes.entry(route.as_ptr() as usize).or_default();
        let found = handles
            .iter()
            .position(|h| h.status == status && h.method == method && *h.route == *route);
        let handle = match found {
            Some(i) => &handles[i],
            None => {
                let labels = [
                    ("method", method.to_string()),
                    ("route", route.to_string()),
                    ("status", status.to_string()),
                ];
                handles.push(Handles {
                    method,
                    route: route.into(),
                    status,
                    requests: metrics::counter!(m::HTTP_REQUESTS, &labels),
                    duration: metrics::histogram!(m::HTTP_REQUEST_DURATION, &labels),
                });
                &handles[handles.len() - 1]
            }
        };
        handle.requests.increment(1);
        handle.duration.record(seconds);
    });
}

/// Standard methods by name, anything else as `other` (the method is client-chosen text).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edge with a 200 ms deadline and a 64-byte body limit, in front of a router whose
    /// `/json` answers 100 bytes of JSON, `/slow` answers after 10 s, and `/echo` reads its body.
    fn edge() -> Edge<axum::Router> {
        use axum::routing::{get, post};
        let json = || async {
            (
                [(header::CONTENT_TYPE, "application/json")],
                "1".repeat(100),
            )
        };
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            "late"
        };
        let router = axum::Router::new()
            .route("/json", get(json))
            .route("/slow", get(slow))
            .route("/echo", post(|body: Bytes| async move { body }));
        let routes = RouteTable::new(["/json", "/slow", "/echo"], []);
        EdgeLayer::new(Duration::from_millis(200), 64, routes).layer(router)
    }

    async fn send(request: Request) -> Response<Body> {
        use tower::ServiceExt;
        edge().oneshot(request).await.unwrap()
    }

    async fn json_body(response: Response<Body>) -> serde_json::Value {
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    fn get(path: &str, accept_encoding: Option<&str>) -> Request {
        let mut request = Request::get(path);
        if let Some(encoding) = accept_encoding {
            request = request.header(header::ACCEPT_ENCODING, encoding);
        }
        request.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn responses_vary_on_accept_encoding_and_are_compressed_only_for_clients_that_ask() {
        let plain = send(get("/json", None)).await;
        assert_eq!(plain.headers()[header::VARY], "accept-encoding");
        assert!(!plain.headers().contains_key(header::CONTENT_ENCODING));
        let body = axum::body::to_bytes(plain.into_body(), 1024).await.unwrap();
        assert_eq!(body.len(), 100);

        let gzip = send(get("/json", Some("gzip"))).await;
        assert_eq!(gzip.headers()[header::VARY], "accept-encoding");
        assert_eq!(gzip.headers()[header::CONTENT_ENCODING], "gzip");
    }

    #[tokio::test]
    async fn a_handler_past_the_deadline_answers_504_in_the_json_shape() {
        let started = Instant::now();
        let response = send(get("/slow", None)).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            !response.headers().contains_key(header::VARY),
            "an empty answer is not one compression would touch"
        );
        assert_eq!(json_body(response).await["error"]["code"], "timeout");
    }

    #[tokio::test]
    async fn bodies_past_the_limit_answer_413_and_bodies_within_it_are_read() {
        let post = |bytes: usize| {
            Request::post("/echo")
                .header(header::CONTENT_LENGTH, bytes)
                .body(Body::from("x".repeat(bytes)))
                .unwrap()
        };
        assert_eq!(send(post(64)).await.status(), StatusCode::OK);
        let response = send(post(65)).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            json_body(response).await["error"]["code"],
            "payload_too_large"
        );
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_json_shape_with_a_request_id() {
        use tower::ServiceExt;
        let service = EdgeLayer::new(Duration::from_secs(30), 1 << 20, RouteTable::default())
            .layer(tower::service_fn(|_: Request| async {
                if true {
                    panic!("boom");
                }
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }));
        let response = service.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(response.status(), 500);
        assert!(response.headers().contains_key(&REQUEST_ID));
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal", "{body}");
    }

    #[tokio::test]
    async fn a_clients_request_id_is_kept_unless_it_is_too_long() {
        use tower::ServiceExt;
        let echo = || {
            EdgeLayer::new(Duration::from_secs(30), 1 << 20, RouteTable::default()).layer(
                tower::service_fn(|_: Request| async {
                    Ok::<_, Infallible>(Response::new(Body::empty()))
                }),
            )
        };
        for (sent, kept) in [("abc-123".to_string(), true), ("x".repeat(4096), false)] {
            let mut request = Request::new(Body::empty());
            request
                .headers_mut()
                .insert(&REQUEST_ID, HeaderValue::from_str(&sent).unwrap());
            let response = echo().oneshot(request).await.unwrap();
            let answered = response.headers()[&REQUEST_ID].to_str().unwrap();
            assert_eq!(answered == sent, kept, "{} bytes", sent.len());
            assert!(answered.len() <= MAX_CLIENT_REQUEST_ID);
        }
    }

    #[test]
    fn the_route_table_labels_paths_by_template_and_unknown_paths_not_at_all() {
        let table = RouteTable::new(["/listings", "/listings/{version_id}", "/health"], []);
        let label = |path: &str| table.at(path).map(|t| t.to_string());
        assert_eq!(
            label("/listings/abc").as_deref(),
            Some("/listings/{version_id}")
        );
        assert_eq!(label("/listings").as_deref(), Some("/listings"));
        assert_eq!(label("/listings/abc/more"), None);
        assert_eq!(label("/no/such/route"), None);
        let (a, b) = (
            table.at("/listings/a").unwrap(),
            table.at("/listings/b").unwrap(),
        );
        assert!(
            Arc::ptr_eq(&a, &b),
            "one Arc per template: metric handles are keyed by it"
        );
    }

    #[tokio::test]
    async fn the_peer_address_reaches_the_requests_a_limit_can_apply_to() {
        use tower::ServiceExt;
        let peer = |request: Request| async move {
            let info = request.extensions().get::<ConnectInfo<SocketAddr>>();
            info.map_or("none".to_string(), |ConnectInfo(addr)| addr.to_string())
        };
        let router = axum::Router::new().route("/peer", axum::routing::any(peer));
        let edge = EdgeLayer::new(
            Duration::from_secs(30),
            1 << 20,
            RouteTable::new(["/peer"], []),
        )
        .layer(router)
        .for_peer("10.1.2.3:4567".parse().unwrap());
        let ask = |method: Method, token: bool| {
            let mut request = Request::builder().method(method).uri("/peer");
            if token {
                request = request.header(header::AUTHORIZATION, "Bearer x");
            }
            edge.clone().oneshot(request.body(Body::empty()).unwrap())
        };
        for (method, token, seen) in [
            (Method::GET, false, "none"),
            (Method::GET, true, "10.1.2.3:4567"),
            (Method::POST, false, "10.1.2.3:4567"),
        ] {
            let response = ask(method.clone(), token).await.unwrap();
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            assert_eq!(body, seen.as_bytes(), "{method} with a token: {token}");
        }
    }

    /// An edge in front of a router whose `/item/{id}` answers `router:{id}` padded to 40
    /// bytes of JSON, with `/item/{id}` also a fast route answering `fast:{id}` the same way,
    /// except for the id `pass`, which it hands back to the router.
    fn edge_with_a_fast_route() -> App {
        use axum::extract::Path;
        fn answer(by: &str, id: &str) -> Response<Body> {
            let body = format!("\"{:<38}\"", format!("{by}:{id}"));
            let mut response = Response::new(Body::from(body));
            let json = HeaderValue::from_static("application/json");
            response.headers_mut().insert(header::CONTENT_TYPE, json);
            response
        }
        let router = axum::Router::new().route(
            "/item/{id}",
            axum::routing::get(|Path(id): Path<String>| async move { answer("router", &id) }),
        );
        let fast = FastRoute::new("/item/{id}", |id, _| {
            let id = id.to_owned();
            (id != "pass").then(|| -> FastFuture { Box::pin(async move { answer("fast", &id) }) })
        });
        let routes = RouteTable::new(["/item/{id}"], [fast]);
        EdgeLayer::new(Duration::from_secs(30), 1 << 20, routes).layer(router)
    }

    #[tokio::test]
    async fn a_fast_routes_plain_gets_are_served_past_the_router_and_the_rest_through_it() {
        use tower::ServiceExt;
        let ask = |request: axum::http::request::Builder, body: Body| async move {
            let response = edge_with_a_fast_route()
                .oneshot(request.body(body).unwrap())
                .await
                .unwrap();
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(body, 1024).await.unwrap();
            (parts, String::from_utf8_lossy(&body).into_owned())
        };
        let get = |uri: &str| Request::get(uri);

        let (parts, body) = ask(get("/item/a"), Body::empty()).await;
        assert!(body.starts_with("\"fast:a "), "{body}");
        assert_eq!(
            parts.headers[header::CONTENT_LENGTH],
            "40",
            "as axum sets it"
        );
        assert_eq!(parts.headers[header::VARY], "accept-encoding");
        assert!(parts.headers.contains_key(&REQUEST_ID));

        let gzip = get("/item/a").header(header::ACCEPT_ENCODING, "gzip");
        let (parts, _) = ask(gzip, Body::empty()).await;
        assert_eq!(parts.headers[header::CONTENT_ENCODING], "gzip");

        for (request, body, why) in [
            (get("/item/%61"), Body::empty(), "a % in the path"),
            (get("/item/pass"), Body::empty(), "handed back"),
            (
                get("/item/a").header(header::AUTHORIZATION, "Bearer x"),
                Body::empty(),
                "credentials",
            ),
            (get("/item/a"), Body::from("x"), "a body"),
        ] {
            let (parts, body) = ask(request, body).await;
            assert_eq!(parts.status, StatusCode::OK, "{why}");
            assert!(body.starts_with("\"router:"), "{why}: {body}");
        }

        let (parts, body) = ask(Request::head("/item/a"), Body::empty()).await;
        assert_eq!((parts.status, body.as_str()), (StatusCode::OK, ""));
        assert_eq!(parts.headers[header::CONTENT_LENGTH], "40");

        let (parts, body) = ask(Request::post("/item/a"), Body::empty()).await;
        assert_eq!(parts.status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
        assert!(
            body.contains("\"error\""),
            "axum's 405 in the JSON shape: {body}"
        );
        let (parts, _) = ask(get("/item/a/"), Body::empty()).await;
        assert_eq!(parts.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn request_ids_are_distinct_hex_of_uuid_length() {
        let a = next_request_id();
        let b = next_request_id();
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            &a[..16],
            &b.to_str().unwrap()[..16],
            "one prefix per process"
        );
    }
}
