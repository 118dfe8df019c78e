//! `/bench/fixed/{bytes}` (mounted by `cascade-bench serve` only): a fixed body through the
//! whole middleware stack, as a handler that does no work would return it — the same-stack
//! baseline. The body is built once per size and thread and shared after, as the bare ceiling
//! (`bare.rs`) shares its one body: the row measures the middleware, not a `memset`.

use std::cell::RefCell;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use cascade_http::{ApiError, FastRoute};

/// Bodies above this are refused: the route exists to mirror an API answer, not to stream.
const FIXED_MAX: usize = 1 << 20;

/// The route's path template.
pub const PATH: &str = "/bench/fixed/{bytes}";

pub fn router() -> Router {
    Router::new().route(
        PATH,
        get(|Path(bytes): Path<usize>| async move { fixed(bytes) }),
    )
}

/// The route's `GET` as the edge serves it past the router, as the hot read is served: a
/// size that is not a number is the router's to refuse (axum's words).
pub fn fast_route() -> FastRoute {
    FastRoute::new(PATH, |bytes, _| {
        let bytes = bytes.parse::<usize>().ok()?;
        Some(Box::pin(async move { fixed(bytes).into_response() }))
    })
}

/// `bytes` bytes of JSON (a string of `x`).
fn fixed(bytes: usize) -> Result<impl IntoResponse, ApiError> {
    if !(2..=FIXED_MAX).contains(&bytes) {
        return Err(ApiError::bad_request(
            "bytes",
            "must be between 2 and 1048576",
        ));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body(bytes)))
}

thread_local! {
    /// The last body this thread built: a run asks for one size.
    static LAST: RefCell<Bytes> = const { RefCell::new(Bytes::new()) };
}

/// `bytes` bytes of JSON (a string of `x`).
fn body(bytes: usize) -> Bytes {
    LAST.with_borrow_mut(|last| {
        if last.len() != bytes {
            let mut body = Vec::with_capacity(bytes);
            body.push(b'"');
            body.resize(bytes - 1, b'x');
            body.push(b'"');
            *last = Bytes::from(body);
        }
        last.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_of_the_asked_size_whatever_was_asked_before() {
        for bytes in [1190, 2, 1190, 40] {
            let b = body(bytes);
            assert_eq!(b.len(), bytes);
            assert!(serde_json::from_slice::<String>(&b).is_ok());
        }
    }

    #[tokio::test]
    async fn the_fast_route_answers_as_the_router_and_leaves_it_what_is_not_a_size() {
        use tower::ServiceExt;
        let route = fast_route();
        let headers = axum::http::HeaderMap::new();
        for size in ["348", "1", "2000000"] {
            let request = axum::http::Request::get(format!("/bench/fixed/{size}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let routed = router().oneshot(request).await.unwrap();
            let fast = (route.handler)(size, &headers).expect("a size").await;
            assert_eq!(fast.status(), routed.status(), "{size}");
            let kind =
                |r: &axum::response::Response| r.headers().get(header::CONTENT_TYPE).cloned();
            assert_eq!(kind(&fast), kind(&routed), "{size}");
            let body = |r: axum::response::Response| axum::body::to_bytes(r.into_body(), 1 << 21);
            assert_eq!(body(fast).await.unwrap(), body(routed).await.unwrap());
        }
        assert!((route.handler)("abc", &headers).is_none());
    }
}
