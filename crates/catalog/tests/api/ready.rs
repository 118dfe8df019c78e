use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Catalog, assert_bad_field, get, send};

fn missing(ready: &Value) -> Vec<(String, Vec<String>)> {
    ready["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["versionId"].as_str().unwrap().to_string(),
                m["missing"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn owned(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(v, r)| (v.to_string(), r.iter().map(|s| s.to_string()).collect()))
        .collect()
}

#[tokio::test]
async fn readiness_names_what_is_missing_until_the_whole_lineage_is_entitled() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("parent", "acme", "P").await;
    catalog.asset("child", "acme", "C").await;
    catalog.lineage(&["parent", "upstream"], &["child"]).await;

    let (status, ready) = get(base, "/ready?versionId=child").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], false);
    assert_eq!(
        missing(&ready),
        owned(&[
            ("child", &["receipt", "policy"]),
            ("parent", &["receipt", "policy"]),
            ("upstream", &["asset", "receipt", "policy"]),
        ])
    );

    catalog.entitle("child").await;
    catalog.entitle("parent").await;
    let (_, ready) = get(base, "/ready?versionId=child").await;
    assert_eq!(
        missing(&ready),
        owned(&[("upstream", &["asset", "receipt", "policy"])])
    );

    catalog.asset("upstream", "acme", "U").await;
    let (_, ready) = get(base, "/ready?versionId=child").await;
    assert_eq!(
        missing(&ready),
        owned(&[("upstream", &["receipt", "policy"])])
    );
    catalog.entitle("upstream").await;
    let (_, ready) = get(base, "/ready?versionId=child").await;
    assert_eq!(
        (ready["ready"].as_bool(), ready["checked"].as_u64()),
        (Some(true), Some(3))
    );

    let (status, _) = get(base, "/ready?versionId=ghost").await;
    assert_eq!(status, 404);
    let (status, body) = get(base, "/ready").await;
    assert_bad_field(status, &body, "versionId");
}

#[tokio::test]
async fn an_expired_receipt_stops_counting_without_any_write() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a", "acme", "A").await;
    let client = catalog.pg.client(&catalog.database).await;
    let soon: String = client
        .query_one(
            "SELECT to_char((now() + interval '2 seconds') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for (path, body) in [
        (
            "/receipts",
            json!({"versionId": "a", "payer": "p", "amount": 5, "expiresAt": soon}),
        ),
        (
            "/receipts",
            json!({"versionId": "a", "payer": "p", "amount": 5, "expiresAt": "2000-01-01T00:00:00Z"}),
        ),
        ("/policies", json!({"versionId": "a", "document": {}})),
    ] {
        let (status, answer) = send(base, Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "{answer}");
    }
    let (_, ready) = get(base, "/ready?versionId=a").await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert!(ready["validUntil"].is_string(), "{ready}");

    // Polled, not slept: the cached answer is dropped once the receipt it relied on expires.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, ready) = get(base, "/ready?versionId=a").await;
        if ready["ready"] == false {
            assert_eq!(missing(&ready), owned(&[("a", &["receipt"])]));
            break;
        }
        assert!(Instant::now() < deadline, "still ready: {ready}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn lineage_deeper_than_the_walk_is_not_vouched_for() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    // v0 <- v1 <- ... <- v32: exactly as deep as readiness walks, every version entitled.
    let deepest = 32;
    for i in 0..=deepest {
        let version = format!("v{i}");
        catalog.asset(&version, "acme", &version).await;
        catalog.entitle(&version).await;
        if i > 0 {
            catalog
                .lineage(&[&format!("v{}", i - 1)], &[&version])
                .await;
        }
    }
    let path = format!("/ready?versionId=v{deepest}");
    let (status, ready) = get(base, &path).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checked"], deepest + 1);
    assert_eq!(ready["truncated"], false);
    assert_eq!(ready["ready"], true, "{ready}");

    // One more ancestor beyond the walk: not checked, so not vouched for.
    catalog.asset("origin", "acme", "origin").await;
    catalog.entitle("origin").await;
    catalog.lineage(&["origin"], &["v0"]).await;
    let (_, ready) = get(base, &path).await;
    assert_eq!(ready["truncated"], true, "{ready}");
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["missing"], json!([]), "nothing checked is missing");

    // A cycle within the walk is not a truncation.
    catalog.lineage(&["v1"], &["v0"]).await;
    let (_, ready) = get(base, "/ready?versionId=v3").await;
    assert_eq!(ready["truncated"], false, "{ready}");
    assert_eq!(ready["ready"], true, "{ready}");
}
