//! `/bench/fixed/{bytes}` (mounted by `cascade-bench serve` only): a fixed body through the
//! whole middleware stack, as a handler that does no work would return it — the same-stack
//! baseline.

use axum::Router;
use axum::extract::Path;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use cascade_http::ApiError;

/// Bodies above this are refused: the route exists to mirror an API answer, not to stream.
const FIXED_MAX: usize = 1 << 20;

pub fn router() -> Router {
    Router::new().route("/bench/fixed/{bytes}", get(fixed))
}

/// `bytes` bytes of JSON (a string of `x`).
async fn fixed(Path(bytes): Path<usize>) -> Result<impl IntoResponse, ApiError> {
    if !(2..=FIXED_MAX).contains(&bytes) {
        return Err(ApiError::bad_request(
            "bytes",
            "must be between 2 and 1048576",
        ));
    }
    let mut body = Vec::with_capacity(bytes);
    body.push(b'"');
    body.resize(bytes - 1, b'x');
    body.push(b'"');
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}
