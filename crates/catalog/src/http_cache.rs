//! HTTP caching of catalog reads: `Cache-Control`, strong ETags and `304 Not Modified`.
//!
//! The ETag is a hash of the exact body bytes, so it changes exactly when the body does, on
//! every instance alike (no per-instance version counters to agree on).

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

/// Asset details (seed 003).
pub const ASSET: &str = "public, max-age=300";
/// Listings (seed 003).
pub const LISTINGS: &str = "public, max-age=120";
/// Bundles and readiness change with lineage anywhere above them: clients revalidate (cheap
/// with the ETag) rather than trust a copy.
pub const REVALIDATE: &str = "no-cache";

/// `"<32 hex digits>"`: the first 128 bits of the body's SHA-256.
pub fn etag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    for byte in &digest[..16] {
        tag.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        tag.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    tag.push('"');
    tag
}

/// Whether `If-None-Match` names `etag` (weak comparison, as RFC 9110 prescribes for it).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// A JSON body with its ETag and `Cache-Control`, or a bodiless 304 when the client has it.
pub fn respond(request: &HeaderMap, body: &[u8], cache_control: &'static str) -> Response {
    let tag = etag(body);
    let fresh = not_modified(request, &tag);
    let mut response = if fresh {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(body.to_vec()))
    };
    if fresh {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
    } else {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    if let Ok(value) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, value);
    }
    response
}

/// A JSON body built by PostgreSQL, with `status` (writes).
pub fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_strong_quoted_and_tracks_the_bytes() {
        let a = etag(b"{\"a\":1}");
        assert_eq!(a.len(), 34);
        assert!(a.starts_with('"') && a.ends_with('"'));
        assert_eq!(a, etag(b"{\"a\":1}"));
        assert_ne!(a, etag(b"{\"a\":2}"));
    }

    #[test]
    fn if_none_match_lists_and_weak_forms_match() {
        let tag = etag(b"x");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", W/{tag}")).unwrap(),
        );
        assert!(not_modified(&headers, &tag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&headers, &tag));
    }
}
