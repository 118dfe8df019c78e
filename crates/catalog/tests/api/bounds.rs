//! Everything a client controls is bounded: listing cache keys are canonical (one key and one
//! load per query, however it is spelled), cursors have a length, metadata a size, and a
//! listing page a byte budget.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Catalog, assert_bad_field, get, http, send};

#[tokio::test]
async fn every_spelling_of_a_listing_query_shares_one_cache_key() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    for i in 0..3 {
        catalog.asset(&format!("a{i}"), "acme", "A").await;
    }
    assert_eq!(catalog.redis_keys("cascade:cache:listings:*").len(), 0);
    // One instant, four spellings (and a limit with a leading zero): each used to be its own
    // key and its own load.
    let mut bodies = HashSet::new();
    for after in [
        "2025-01-31T12:00:00Z",
        "2025-01-31T14:00:00%2B02:00",
        "2025-01-31t07:30:00.000-04:30",
        "2025-01-31%2012:00:00.000000z",
    ] {
        for limit in ["10", "010"] {
            let (status, page) = get(
                base,
                &format!("/listings?createdAfter={after}&limit={limit}&q=%20A%20"),
            )
            .await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["items"].as_array().unwrap().len(), 3, "{page}");
            bodies.insert(page.to_string());
        }
    }
    assert_eq!(bodies.len(), 1);
    assert_eq!(
        catalog.redis_keys("cascade:cache:listings:*").len(),
        1,
        "one key, so one load"
    );

    // A cursor is bounded as the OpenAPI document describes it: at most 16 digits.
    let (_, page) = get(base, "/listings?limit=1").await;
    let cursor = page["nextCursor"].as_str().unwrap().to_string();
    let (status, _) = get(base, &format!("/listings?limit=1&cursor={cursor}")).await;
    assert_eq!(status, 200);
    let (status, body) = get(base, &format!("/listings?limit=1&cursor=0{cursor}")).await;
    assert_bad_field(status, &body, "cursor");
    assert_eq!(catalog.redis_keys("cascade:cache:listings:*").len(), 3);
}

#[tokio::test]
async fn an_overlong_cursor_is_refused_and_makes_no_key() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    for cursor in [
        format!("1738324800000000.{}", "x".repeat(60_000)),
        format!("1738324800000000.{}", "x".repeat(284)),
        format!("{}.a", "1".repeat(300)),
    ] {
        let (status, body) = get(base, &format!("/listings?cursor={cursor}")).await;
        assert_bad_field(status, &body, "cursor");
    }
    // The longest real cursor (an id of 256 bytes) is fine.
    let (status, body) = get(
        base,
        &format!("/listings?cursor=1738324800000000.{}", "x".repeat(256)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(catalog.redis_keys("cascade:cache:listings:*").len(), 1);
}

#[tokio::test]
async fn metadata_is_capped_at_16_kib() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    let sized = |bytes: usize| json!({"description": "x".repeat(bytes - 18)});
    assert_eq!(sized(16 * 1024).to_string().len(), 16 * 1024);
    let (status, body) = send(
        base,
        Method::POST,
        "/assets",
        Some(json!({"versionId": "a", "producerId": "acme", "name": "A",
                    "metadata": sized(16 * 1024 + 1)})),
    )
    .await;
    assert_bad_field(status, &body, "metadata");
    let (status, body) = send(
        base,
        Method::POST,
        "/assets",
        Some(json!({"versionId": "a", "producerId": "acme", "name": "A",
                    "metadata": sized(16 * 1024)})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(
        base,
        Method::PATCH,
        "/listings/a",
        Some(json!({"metadata": sized(100_000)})),
    )
    .await;
    assert_bad_field(status, &body, "metadata");
    let (_, asset) = get(base, "/listings/a").await;
    assert_eq!(asset["metadata"], sized(16 * 1024));
}

#[tokio::test]
async fn a_listing_page_ends_before_1_mib_and_paging_still_sees_every_item_once() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    // 80 items of ~16 KiB: about 1.3 MiB if one page held them all.
    let count = 80;
    for i in 0..count {
        let (status, body) = send(
            base,
            Method::POST,
            "/assets",
            Some(
                json!({"versionId": format!("big-{i:02}"), "producerId": "acme",
                        "name": format!("Big {i}"),
                        "metadata": {"description": "x".repeat(16_000)}}),
            ),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut path = "/listings?limit=100".to_string();
    for _ in 0..count {
        let response = http().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let bytes = response.bytes().await.unwrap();
        assert!(
            bytes.len() <= 1024 * 1024,
            "a page of {} bytes",
            bytes.len()
        );
        let page: Value = serde_json::from_slice(&bytes).unwrap();
        pages += 1;
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty());
        seen.extend(
            items
                .iter()
                .map(|a| a["versionId"].as_str().unwrap().to_string()),
        );
        match page["nextCursor"].as_str() {
            Some(cursor) => path = format!("/listings?limit=100&cursor={cursor}"),
            None => break,
        }
    }
    assert!(pages >= 2, "the first page ended early");
    let expected: Vec<String> = (0..count).rev().map(|i| format!("big-{i:02}")).collect();
    assert_eq!(seen, expected, "newest first, each once");
}
