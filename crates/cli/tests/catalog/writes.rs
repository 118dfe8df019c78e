use reqwest::Method;
use serde_json::json;

use crate::support::{Catalog, assert_bad_field, get, send};

#[tokio::test]
async fn producers_and_assets_are_created_changed_and_deleted_with_clear_errors() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;

    let (status, body) = send(
        base,
        Method::POST,
        "/producers",
        Some(json!({"producerId": "acme", "name": "again"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let (status, body) = send(
        base,
        Method::POST,
        "/producers",
        Some(json!({"producerId": "x"})),
    )
    .await;
    assert_bad_field(status, &body, "name");
    let (status, body) = send(base, Method::POST, "/producers", Some(json!([1]))).await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = send(
        base,
        Method::POST,
        "/assets",
        Some(
            json!({"versionId": "weather@1", "producerId": "acme", "name": "Weather",
                    "metadata": {"description": "hourly observations", "rows": 10}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["versionId"], "weather@1");
    assert_eq!(body["metadata"]["rows"], 10);

    for (request, field) in [
        (json!({"producerId": "acme", "name": "n"}), "versionId"),
        (
            json!({"versionId": "a b", "producerId": "acme", "name": "n"}),
            "versionId",
        ),
        (json!({"versionId": "v", "name": "n"}), "producerId"),
        (
            json!({"versionId": "v", "producerId": "acme", "name": ""}),
            "name",
        ),
        (
            json!({"versionId": "v", "producerId": "acme", "name": "n", "metadata": "x"}),
            "metadata",
        ),
    ] {
        let (status, body) = send(base, Method::POST, "/assets", Some(request)).await;
        assert_bad_field(status, &body, field);
    }
    let (status, body) = send(
        base,
        Method::POST,
        "/assets",
        Some(json!({"versionId": "weather@1", "producerId": "acme", "name": "dup"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = send(
        base,
        Method::POST,
        "/assets",
        Some(json!({"versionId": "v2", "producerId": "nobody", "name": "n"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nobody")
    );
    assert_eq!(
        catalog.count("assets").await,
        1,
        "refused writes wrote nothing"
    );

    let (status, body) = get(base, "/listings/weather@1").await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Weather")));
    let (status, body) = get(base, "/listings/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    let (status, body) = send(
        base,
        Method::PATCH,
        "/listings/weather@1",
        Some(json!({"name": "Weather (hourly)", "metadata": {"rows": 11}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "Weather (hourly)");
    assert_eq!(body["metadata"], json!({"rows": 11}));
    let (_, body) = get(base, "/listings/weather@1").await;
    assert_eq!(
        body["name"], "Weather (hourly)",
        "the cached copy was replaced"
    );
    let (status, body) = send(base, Method::PATCH, "/listings/weather@1", Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = send(
        base,
        Method::PATCH,
        "/listings/nope",
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 404);

    let (status, _) = send(base, Method::DELETE, "/listings/weather@1", None).await;
    assert_eq!(status, 204);
    let (status, _) = get(base, "/listings/weather@1").await;
    assert_eq!(status, 404);
    let (status, _) = send(base, Method::DELETE, "/listings/weather@1", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn receipts_and_policies_need_an_existing_asset_and_valid_fields() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a@1", "acme", "A").await;
    catalog.entitle("a@1").await;

    for (path, request, field) in [
        (
            "/receipts",
            json!({"versionId": "a@1", "payer": "p", "amount": -1}),
            "amount",
        ),
        (
            "/receipts",
            json!({"versionId": "a@1", "amount": 1}),
            "payer",
        ),
        (
            "/receipts",
            json!({"versionId": "a@1", "payer": "p", "amount": 1, "expiresAt": "soon"}),
            "expiresAt",
        ),
        ("/policies", json!({"versionId": "a@1"}), "document"),
        ("/policies", json!({"document": {}}), "versionId"),
    ] {
        let (status, body) = send(base, Method::POST, path, Some(request)).await;
        assert_bad_field(status, &body, field);
    }
    for path in ["/receipts", "/policies"] {
        let (status, body) = send(
            base,
            Method::POST,
            path,
            Some(json!({"versionId": "ghost", "payer": "p", "amount": 1, "document": {}})),
        )
        .await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    assert_eq!(catalog.count("receipts").await, 1);
    assert_eq!(catalog.count("policies").await, 1);
}
