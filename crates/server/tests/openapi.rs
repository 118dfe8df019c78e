//! The OpenAPI document describes exactly the routes the application answers.
//!
//! The routes are read from the composed router itself, not from a list kept by hand: its
//! paths from axum's `Debug` rendering of the router (the only place axum exposes them), its
//! methods from what each path answers to a method nobody registers (axum's 405 carries
//! `Allow`, the methods that path has). A `.route("/x", get(h))` added anywhere, in the server
//! or in a module, without its `#[utoipa::path]` fails here; so does a documented operation
//! the router does not answer.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

mod common;
use common::application;

/// Path templates in the router's `Debug` text: its route table prints as
/// `RouteId(n): "/path"` in its `path_router`. Axum's internal routes (a nest's tail) are left out.
fn router_paths(debug: &str) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    // The fallback router's own table (`/` and a catch-all) follows; it is not a route.
    let routes = debug.split("fallback_router:").next().unwrap_or(debug);
    for piece in routes.split("RouteId(").skip(1) {
        let Some((_, rest)) = piece.split_once("): \"") else {
            continue;
        };
        let Some(path) = rest.split('"').next() else {
            continue;
        };
        if !path.contains("__private__axum") {
            paths.insert(path.to_string());
        }
    }
    paths
}

/// `/listings/{version_id}` → `/listings/probe`.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "probe"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let methods: BTreeSet<String> = item
            .as_object()
            .expect("a path item")
            .keys()
            .filter(|k| {
                [
                    "get", "put", "post", "delete", "options", "head", "patch", "trace",
                ]
                .contains(&k.as_str())
            })
            .map(|k| k.to_uppercase())
            .collect();
        out.insert(path.clone(), methods);
    }
    out
}

#[tokio::test]
async fn every_route_the_application_answers_is_documented_and_nothing_else() {
    let (_pg, app) = application().await;
    let router = app.router();

    let response = router
        .clone()
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let doc: Value = serde_json::from_slice(&bytes).expect("the document is JSON");
    // Left in the build directory for a look (`/docs` can render it from there).
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("openapi.json"),
        &bytes,
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let documented = documented(&doc);

    let paths = router_paths(&format!("{router:?}"));
    // If axum's Debug output changed shape, say so instead of passing on an empty list.
    assert!(
        paths.contains("/openapi.json") && paths.contains("/health") && paths.len() > 10,
        "could not read the routes from the router's Debug output (axum changed it?): {paths:?}"
    );

    // The benchmark's routes are mounted by `cascade-bench serve` only: never here, even in a
    // workspace build where cargo compiled the catalog's bench handlers in.
    assert!(
        !paths.iter().any(|p| p.starts_with("/bench")),
        "the product's router has a benchmark route: {paths:?}"
    );

    let mut problems = Vec::new();
    for path in &paths {
        if !documented.contains_key(path) {
            problems.push(format!("{path}: routed but not in /openapi.json"));
        }
    }
    for path in documented.keys() {
        if !paths.contains(path) {
            problems.push(format!("{path}: in /openapi.json but not routed"));
        }
    }
    for path in &paths {
        let probe = Request::builder()
            .method(Method::from_bytes(b"PROBE").unwrap())
            .uri(concrete(path))
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(probe).await.unwrap();
        if response.status() != StatusCode::METHOD_NOT_ALLOWED {
            problems.push(format!(
                "{path}: answers any method ({}), which cannot be documented",
                response.status()
            ));
            continue;
        }
        let allow: BTreeSet<String> = response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty() && m != "HEAD") // axum answers HEAD wherever GET is
            .collect();
        let described = documented.get(path).cloned().unwrap_or_default();
        for method in allow.difference(&described) {
            problems.push(format!("{method} {path}: routed but not documented"));
        }
        for method in described.difference(&allow) {
            problems.push(format!("{method} {path}: documented but not routed"));
        }
    }
    assert!(
        problems.is_empty(),
        "the router and /openapi.json disagree; describe each route with #[utoipa::path] and \
         list it in its module's OpenApi:\n  {}",
        problems.join("\n  ")
    );
    app.stop().await;
}

#[test]
fn the_route_reader_sees_what_debug_prints() {
    let router: axum::Router = axum::Router::new()
        .route("/a", axum::routing::get(|| async {}))
        .route("/b/{id}", axum::routing::post(|| async {}));
    let paths = router_paths(&format!("{router:?}"));
    assert_eq!(
        paths,
        ["/a", "/b/{id}"].iter().map(|s| s.to_string()).collect()
    );
}

#[tokio::test]
async fn the_docs_page_is_self_contained() {
    let (_pg, app) = application().await;
    let response = app
        .router()
        .oneshot(Request::get("/docs").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let page = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(page.contains("fetch(\"openapi.json\""));
    for external in ["src=\"http", "href=\"http", "<link", "@import", "//cdn"] {
        assert!(!page.contains(external), "the page loads {external}");
    }
    app.stop().await;
}
