//! The routes the edge serves past axum's router (`GET /listings/{version_id}`) answer exactly
//! as the router does: the same status, the same headers in the same order, the same body,
//! for a hot read, a revalidation, a bad or unknown id, a percent-encoded id, `HEAD`, a
//! method the route has not, a client that asks for compression and a trailing slash. The
//! reference is the same application with every request left to the router
//! ([`App::routed_only`]).

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use cascade_catalog::seed::{SeedOptions, seed, version_id};
use cascade_server::http::App;
use tower::ServiceExt;

mod common;
use common::application;

/// What a client sees of a response.
#[derive(Debug, PartialEq)]
struct Seen {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn send(app: &App, method: Method, uri: &str, headers: &HeaderMap) -> Seen {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    *request.headers_mut() = headers.clone();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.to_string(), value)
        })
        .collect();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec();
    Seen {
        status: parts.status,
        headers,
        body,
    }
}

#[tokio::test]
async fn the_hot_read_answers_past_the_router_exactly_as_through_it() {
    let (_pg, app) = application().await;
    let options = SeedOptions {
        assets: 3,
        producers: 1,
        seed: 7,
        reset: false,
        owner: None,
    };
    seed(&app.state.db, &options).await.expect("seeded");
    let fast = app.router();
    assert!(
        fast.fast_routes().any(|t| t == "/listings/{version_id}"),
        "the hot read is served past the router"
    );
    let routed = fast.routed_only();
    assert_eq!(routed.fast_routes().count(), 0);
    let id = version_id(1);
    let hot = format!("/listings/{id}");

    // The same client-chosen request id on both, so that every header can be compared.
    let mut plain = HeaderMap::new();
    plain.insert("x-request-id", "fast-routes-test".parse().unwrap());
    let miss = send(&fast, Method::GET, &hot, &plain).await;
    assert_eq!(miss.status, StatusCode::OK, "{miss:?}");
    let etag = miss
        .headers
        .iter()
        .find(|(name, _)| name == "etag")
        .map(|(_, value)| value.clone())
        .expect("an ETag");
    let mut revalidate = plain.clone();
    revalidate.insert(header::IF_NONE_MATCH, etag.parse().unwrap());
    let mut gzip = plain.clone();
    gzip.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());

    // The id with its first letter percent-encoded.
    let encoded = format!("/listings/%{:x}{}", id.as_bytes()[0], &id[1..]);
    let cases = [
        (Method::GET, hot.clone(), &plain, StatusCode::OK),
        (
            Method::GET,
            hot.clone(),
            &revalidate,
            StatusCode::NOT_MODIFIED,
        ),
        (Method::GET, hot.clone(), &gzip, StatusCode::OK),
        (Method::HEAD, hot.clone(), &plain, StatusCode::OK),
        (Method::GET, encoded, &plain, StatusCode::OK),
        (
            Method::GET,
            "/listings/bad!id".into(),
            &plain,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/listings/no-such-asset".into(),
            &plain,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            hot.clone(),
            &plain,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            format!("{hot}/"),
            &plain,
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, uri, headers, status) in cases {
        let through_router = send(&routed, method.clone(), &uri, headers).await;
        let past_router = send(&fast, method.clone(), &uri, headers).await;
        assert_eq!(
            through_router.status, status,
            "{method} {uri}: {through_router:?}"
        );
        assert_eq!(past_router, through_router, "{method} {uri}");
    }

    // The percent-encoded id is the same asset, and a hit the same body as the first read.
    let encoded = format!("/listings/%{:x}{}", id.as_bytes()[0], &id[1..]);
    let decoded = send(&fast, Method::GET, &encoded, &plain).await;
    assert_eq!(decoded.body, miss.body);
    let bad = send(&fast, Method::GET, "/listings/bad!id", &plain).await;
    let bad: serde_json::Value = serde_json::from_slice(&bad.body).unwrap();
    assert_eq!(bad["error"]["field"], "versionId", "{bad}");
    app.stop().await;
}
