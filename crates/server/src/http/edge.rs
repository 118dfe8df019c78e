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
//! credentials and every method but `GET`/`HEAD`/`OPTIONS` (`cascade_http::auth::enforce`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::BoxError;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, Response, header};
use cascade_core::metrics as m;
use cascade_http::auth::RateSlot;
use metrics::{Counter, Histogram};
use tower::{Layer, Service};
use tower_http::compression::Predicate;

use super::middleware::{REQUEST_ID, json_errors};

/// Longest `x-request-id` a client may choose; a longer one is replaced by ours (it would be
/// copied into every log line of the request).
const MAX_CLIENT_REQUEST_ID: usize = 128;

/// The route label of requests that matched no route, so scanners cannot mint one series
/// per path.
const UNMATCHED: &str = "unmatched";

#[derive(Debug, Clone, Copy, Default)]
pub struct EdgeLayer;

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
}

impl<S, B> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response<B>, Error = Infallible>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let id = match request.headers().get(&REQUEST_ID) {
            // A client's own id is kept, when it is short enough to log with every line.
            Some(id) if id.len() <= MAX_CLIENT_REQUEST_ID => id.clone(),
            _ => {
                let id = next_request_id();
                request.headers_mut().insert(REQUEST_ID, id.clone());
                id
            }
        };
        let rate_slot =
            may_be_limited(&request).then(|| RateSlot::attach(request.extensions_mut()));
        let method = method_label(request.method());
        let route = request.extensions().get::<MatchedPath>().cloned();
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %id.to_str().unwrap_or("-"),
        );
        let inner = span.in_scope(|| self.inner.call(request));
        EdgeFuture {
            inner,
            span,
            started,
            id: Some(id),
            rate_slot,
            method,
            route,
        }
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
    pub struct EdgeFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        started: Instant,
        id: Option<HeaderValue>,
        rate_slot: Option<RateSlot>,
        method: &'static str,
        route: Option<MatchedPath>,
    }
}

impl<F, B> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        // A handler that panics answers 500 in the JSON error shape, and the connection lives
        // on. Unwinding is caught here rather than by a layer of its own: that layer boxed
        // every response body.
        let inner = this.inner;
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx)));
        let response = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(response))) => json_errors(response),
            Err(panic) => panicked(panic.as_ref()),
        };
        let mut response = response;
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(REQUEST_ID, id);
        }
        if let Some(slot) = this.rate_slot.take() {
            slot.report(&mut response);
        }
        let status = response.status();
        let elapsed = this.started.elapsed();
        let route = this.route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
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
        let big_enough = match headers.get(header::CONTENT_LENGTH) {
            Some(length) => length
                .to_str()
                .ok()
                .and_then(|l| l.parse::<u64>().ok())
                .is_some_and(|l| l >= 32),
            None => response.body().size_hint().exact().is_none_or(|l| l >= 32),
        };
        let kind = headers
            .get(header::CONTENT_TYPE)
            .map_or(&b""[..], HeaderValue::as_bytes);
        big_enough
            && !kind.starts_with(b"image/")
            && !kind.starts_with(b"application/grpc")
            && !kind.starts_with(b"text/event-stream")
    }
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
    *response.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
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

/// Hashes the address of a route's text: axum hands every request of a route a clone of the
/// same `Arc<str>`, so its address names the route without hashing the text. An address
/// reused by another router's route after the first was dropped is told apart by the text
/// each entry keeps.
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

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_json_shape_with_a_request_id() {
        use tower::ServiceExt;
        let service = EdgeLayer.layer(tower::service_fn(|_: Request| async {
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
            EdgeLayer.layer(tower::service_fn(|_: Request| async {
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }))
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
