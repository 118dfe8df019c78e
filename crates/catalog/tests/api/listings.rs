use std::collections::HashSet;

use reqwest::Method;
use reqwest::header;
use serde_json::json;

use crate::support::http;
use crate::support::{Catalog, assert_bad_field, get, send};

#[tokio::test]
async fn listings_search_filter_and_page_in_a_stable_order() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.producer("globex").await;
    for i in 0..25 {
        let producer = if i % 5 == 0 { "globex" } else { "acme" };
        let name = if i == 7 {
            "Rainfall totals".to_string()
        } else {
            format!("Dataset {i}")
        };
        catalog.asset(&format!("ds-{i:02}"), producer, &name).await;
    }

    let mut seen = Vec::new();
    let mut path = "/listings?limit=10".to_string();
    loop {
        let (status, page) = get(base, &path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["versionId"].as_str().unwrap().to_string()),
        );
        match page["nextCursor"].as_str() {
            Some(cursor) => path = format!("/listings?limit=10&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        25,
        "no repeats across pages"
    );
    assert_eq!(seen[0], "ds-24", "newest first");
    assert_eq!(seen[24], "ds-00");

    let (_, page) = get(base, "/listings?q=rainfall").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(items[0]["versionId"], "ds-07");
    let (_, page) = get(base, "/listings?producer=globex&limit=100").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    let (_, page) = get(base, "/listings?createdAfter=2999-01-01T00:00:00Z").await;
    assert_eq!(page["items"], json!([]));

    let (_, page) = get(base, "/listings?createdBefore=2000-01-01T00:00:00Z").await;
    assert_eq!(page["items"], json!([]));
    let (_, page) = get(
        base,
        "/listings?createdBefore=2999-01-01T00:00:00Z&limit=100",
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 25);
    let long_q = format!("q={}", "x".repeat(201));
    for (query, field) in [
        (long_q.as_str(), "q"),
        ("createdBefore=soon", "createdBefore"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("cursor=zzz", "cursor"),
        ("createdAfter=yesterday", "createdAfter"),
    ] {
        let (status, body) = get(base, &format!("/listings?{query}")).await;
        assert_bad_field(status, &body, field);
    }

    // A new asset is on the first page at once (no stale cached listing).
    catalog.asset("ds-new", "globex", "Fresh").await;
    let (_, page) = get(base, "/listings?limit=10").await;
    assert_eq!(page["items"][0]["versionId"], "ds-new");
    let (status, _) = send(base, Method::DELETE, "/listings/ds-new", None).await;
    assert_eq!(status, 204);
    let (_, page) = get(base, "/listings?limit=10").await;
    assert_eq!(page["items"][0]["versionId"], "ds-24");
}

#[tokio::test]
async fn etags_round_trip_to_304_and_change_with_the_content() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a@1", "acme", "A").await;

    for (path, cache_control) in [
        ("/listings/a@1", "public, max-age=300"),
        ("/listings?limit=5", "public, max-age=120"),
        ("/bundle?versionId=a@1&depth=1", "no-cache"),
        ("/ready?versionId=a@1", "no-cache"),
    ] {
        let url = format!("{base}{path}");
        let first = http().get(&url).send().await.unwrap();
        assert_eq!(first.status(), 200, "{path}");
        assert_eq!(
            first.headers()[header::CACHE_CONTROL],
            cache_control,
            "{path}"
        );
        let etag = first.headers()[header::ETAG].to_str().unwrap().to_string();
        assert!(
            etag.starts_with('"') && !etag.starts_with("W/"),
            "strong: {etag}"
        );

        let again = http()
            .get(&url)
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()[header::ETAG].to_str().unwrap(), etag);
        assert!(again.bytes().await.unwrap().is_empty());

        let other = http()
            .get(&url)
            .header(header::IF_NONE_MATCH, "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 200, "{path}");
    }

    let url = format!("{base}/listings/a@1");
    let etag = http().get(&url).send().await.unwrap().headers()[header::ETAG]
        .to_str()
        .unwrap()
        .to_string();
    let (status, _) = send(
        base,
        Method::PATCH,
        "/listings/a@1",
        Some(json!({"name": "B"})),
    )
    .await;
    assert_eq!(status, 200);
    let changed = http()
        .get(&url)
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200, "a changed asset is not 304");
    assert_ne!(changed.headers()[header::ETAG].to_str().unwrap(), etag);
}

#[tokio::test]
async fn catalog_bodies_are_compact_json() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    let mut bodies = Vec::new();
    let token = crate::support::register(base, "compact").await;
    for (method, path, body) in [
        (
            Method::POST,
            "/producers",
            json!({"producerId": "p", "name": "P"}),
        ),
        (
            Method::POST,
            "/assets",
            json!({"versionId": "a", "producerId": "p", "name": "A",
                   "metadata": {"description": "up", "tags": [1, 2, {"k": [true, null]}]}}),
        ),
        (
            Method::POST,
            "/assets",
            json!({"versionId": "b", "producerId": "p", "name": "B"}),
        ),
        (
            Method::PATCH,
            "/listings/b",
            json!({"metadata": {"x": {"y": 1}}}),
        ),
        (
            Method::POST,
            "/receipts",
            json!({"versionId": "a", "payer": "q", "amount": 1}),
        ),
        (
            Method::POST,
            "/policies",
            json!({"versionId": "a", "document": {"l": [1, 2]}}),
        ),
        (
            Method::POST,
            "/lineage",
            crate::support::run_event(&["a"], &["b"]),
        ),
    ] {
        let response = http()
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{path}");
        bodies.push((path.to_string(), response.text().await.unwrap()));
    }
    for path in [
        "/listings/a",
        "/listings",
        "/bundle?versionId=b&depth=2",
        "/ready?versionId=b",
    ] {
        // Twice: the loaded body and the cached one.
        for _ in 0..2 {
            let response = http().get(format!("{base}{path}")).send().await.unwrap();
            bodies.push((path.to_string(), response.text().await.unwrap()));
        }
    }
    for (path, body) in bodies {
        for spaced in ["\" : ", "\": ", ", ", ": [", "[ ", " ]", " }", "{ ", "\n"] {
            assert!(!body.contains(spaced), "{path}: {spaced:?} in {body}");
        }
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON");
    }
}

/// `q=` finds English stems, name prefixes and names with typos, newest first as always.
#[tokio::test]
async fn listings_q_finds_stems_prefixes_and_typos() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("ds-prices", "acme", "Prices").await;
    catalog
        .asset("ds-ml", "acme", "Machine learning models")
        .await;
    catalog.asset("ds-run", "acme", "Run log").await;
    let (status, body) = send(
        base,
        Method::POST,
        "/assets",
        Some(
            json!({"versionId": "ds-weather", "producerId": "acme", "name": "Weather",
                    "metadata": {"description": "a daily forecast"}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    for (q, expected) in [
        ("price", vec!["ds-prices"]),
        ("running", vec!["ds-run"]),
        ("machne%20lerning", vec!["ds-ml"]),
        ("mach", vec!["ds-ml"]),
        ("forecasts", vec!["ds-weather"]),
        ("zebra", vec![]),
    ] {
        let (status, page) = get(base, &format!("/listings?q={q}")).await;
        assert_eq!(status, 200, "{page}");
        let found: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["versionId"].as_str().unwrap())
            .collect();
        assert_eq!(found, expected, "q={q}: {page}");
    }
}
