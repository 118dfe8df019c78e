//! HTTP caching of catalog reads: `Cache-Control`, strong ETags and `304 Not Modified`.
//!
//! The ETag is a hash of the exact body bytes, so it changes exactly when the body does, on
//! every instance alike (no per-instance version counters to agree on). A cached body's ETag
//! is computed once per in-process cache entry ([`CachedBody::etag`]), and the response body
//! is a view of the cached bytes: a hit neither hashes nor copies.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use cascade_core::cache::CachedBody;

/// Asset details (seed 003).
pub const ASSET: &str = "public, max-age=300";
/// Listings (seed 003).
pub const LISTINGS: &str = "public, max-age=120";
/// Bundles and readiness change with lineage anywhere above them: clients revalidate (cheap
/// with the ETag) rather than trust a copy.
pub const REVALIDATE: &str = "no-cache";

pub use cascade_core::cache::etag;

/// The request's `If-None-Match` values: all a cached read needs of its headers. Taken
/// instead of the `HeaderMap` extractor, which copies every header of every request (an
/// allocation and a clone per header on the hot read; none here when the header is absent).
#[derive(Debug, Default)]
pub struct IfNoneMatch(Vec<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IfNoneMatch::from_headers(&parts.headers))
    }
}

impl IfNoneMatch {
    /// The values in `headers` (a route the edge serves past the router reads them here).
    pub fn from_headers(headers: &HeaderMap) -> IfNoneMatch {
        let values = headers.get_all(header::IF_NONE_MATCH).iter();
        IfNoneMatch(values.cloned().collect())
    }
}

/// Whether `If-None-Match` names `etag` (weak comparison, as RFC 9110 prescribes for it).
fn not_modified(request: &IfNoneMatch, etag: &[u8]) -> bool {
    request
        .0
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).as_bytes() == etag)
}

/// A cached JSON body with its ETag and `Cache-Control`, or a bodiless 304 when the client
/// has it.
pub fn respond(
    request: &IfNoneMatch,
    cached: &CachedBody,
    cache_control: &'static str,
) -> Response {
    let body = Bytes::from_owner(cached.bytes().clone());
    respond_with(request, body, cached.etag(), cache_control)
}

/// [`respond`] for a body that was not cached (its ETag is computed here).
pub fn respond_uncached(
    request: &IfNoneMatch,
    body: Vec<u8>,
    cache_control: &'static str,
) -> Response {
    let tag = Bytes::from(etag(&body));
    respond_with(request, Bytes::from(body), tag, cache_control)
}

fn respond_with(
    request: &IfNoneMatch,
    body: Bytes,
    tag: Bytes,
    cache_control: &'static str,
) -> Response {
    let fresh = not_modified(request, &tag);
    let mut response = if fresh {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(Body::from(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    if let Ok(value) = HeaderValue::from_maybe_shared(tag) {
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
        let listed = HeaderValue::from_str(&format!("\"other\", W/{tag}")).unwrap();
        assert!(not_modified(&IfNoneMatch(vec![listed]), tag.as_bytes()));
        let other = HeaderValue::from_static("\"other\"");
        assert!(!not_modified(
            &IfNoneMatch(vec![other.clone()]),
            tag.as_bytes()
        ));
        let repeated = vec![other, HeaderValue::from_str(&tag).unwrap()];
        assert!(not_modified(&IfNoneMatch(repeated), tag.as_bytes()));
        assert!(!not_modified(&IfNoneMatch::default(), tag.as_bytes()));
    }
}
