//! Cross-cutting HTTP behaviour shared by the layers: the request id header, and turning every
//! error response into the JSON error shape.

use axum::BoxError;
use axum::Json;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderName, Response, StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use cascade_http::error::code_for_status;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Error responses that did not come from a handler (404 of an unknown route, 405, the body
/// limit's 413, the timeout's 504, a caught panic, an extractor's plain-text rejection) get the
/// same JSON shape as ours.
///
/// The new body is plain JSON, so none of the old body's representation headers are kept: a
/// `Content-Encoding: gzip` copied over would label plain JSON as gzip. It runs in the edge
/// layer, outside compression: the new body (a few dozen bytes) goes out uncompressed.
pub fn json_errors<B>(response: Response<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    // The status first: a success (nearly every response) costs no header lookup.
    let is_json = || {
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
    };
    if !(status.is_client_error() || status.is_server_error()) || is_json() {
        return response.map(Body::new);
    }
    let message = match status {
        StatusCode::NOT_FOUND => "no such route".to_string(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body is larger than BODY_LIMIT_BYTES".to_string(),
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => {
            "the request did not finish within REQUEST_TIMEOUT".to_string()
        }
        other => other.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let (parts, _) = response.into_parts();
    let body = Json(json!({ "error": { "code": code_for_status(status), "message": message } }));
    let mut fresh = (status, body).into_response();
    for (name, value) in parts.headers.iter() {
        let describes_old_body = [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
        ]
        .contains(name);
        if !describes_old_body {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}
