use reqwest::Method;
use serde_json::json;

use crate::support::{Catalog, assert_bad_field, get, register, run_event, send, send_as};

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
    for (change, field) in [
        (json!({"name": 7}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"metadata": [1, 2]}), "metadata"),
    ] {
        let (status, body) = send(base, Method::PATCH, "/listings/weather@1", Some(change)).await;
        assert_bad_field(status, &body, field);
    }
    let (_, body) = get(base, "/listings/weather@1").await;
    assert_eq!(
        body["name"], "Weather (hourly)",
        "refused changes wrote nothing"
    );
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
    let (status, receipt) = send(
        base,
        Method::POST,
        "/receipts",
        Some(json!({"versionId": "a@1", "payer": "alice", "amount": 100,
                    "expiresAt": "2999-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(status, 201, "{receipt}");
    assert!(receipt["receiptId"].is_i64(), "{receipt}");
    assert_eq!(
        (&receipt["versionId"], &receipt["payer"], &receipt["amount"]),
        (&json!("a@1"), &json!("alice"), &json!(100))
    );
    assert_eq!(receipt["expiresAt"], "2999-01-01T00:00:00.000000Z");
    let (status, policy) = send(
        base,
        Method::POST,
        "/policies",
        Some(json!({"versionId": "a@1", "document": {"license": "CC-BY-4.0"}})),
    )
    .await;
    assert_eq!(status, 201, "{policy}");
    assert_eq!(policy["document"], json!({"license": "CC-BY-4.0"}));
    assert_eq!(policy["expiresAt"], serde_json::Value::Null);

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

#[tokio::test]
async fn writes_need_an_account_and_only_a_producers_owner_may_change_its_assets() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("acme@1", "acme", "Acme prices").await;
    let mallory = register(base, "mallory").await;
    let asset = json!({"versionId": "acme@2", "producerId": "acme", "name": "forged"});
    let receipt = json!({"versionId": "acme@1", "payer": "mallory", "amount": 1});
    let policy = json!({"versionId": "acme@1", "document": {"license": "mine"}});
    let writes = [
        (
            Method::POST,
            "/producers",
            Some(json!({"producerId": "m", "name": "M"})),
        ),
        (Method::POST, "/assets", Some(asset.clone())),
        (
            Method::PATCH,
            "/listings/acme@1",
            Some(json!({"name": "pwned"})),
        ),
        (Method::DELETE, "/listings/acme@1", None),
        (Method::POST, "/receipts", Some(receipt.clone())),
        (Method::POST, "/policies", Some(policy.clone())),
        (
            Method::POST,
            "/lineage",
            Some(run_event(&["x"], &["acme@1"])),
        ),
    ];

    // No token, or a token that does not verify: 401, nothing written.
    for token in [None, Some("not-a-token")] {
        for (method, path, body) in writes.clone() {
            let (status, answer) = send_as(base, token, method.clone(), path, body).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {answer}");
            assert_eq!(answer["error"]["code"], "unauthorized");
        }
    }

    // Another account: 403 on everything of acme's (lineage into it too), nothing changed,
    // and nothing invalidated: a cached listing page outlives the refused writes.
    let (status, _) = get(base, "/listings").await;
    assert_eq!(status, 200);
    let cached_pages = catalog.redis_keys("cascade:cache:listings:*");
    assert!(!cached_pages.is_empty(), "the listing page is cached");
    for (method, path, body) in writes[1..].iter().cloned() {
        let (status, answer) = send_as(base, Some(&mallory), method.clone(), path, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "forbidden");
    }
    assert_eq!(
        catalog.redis_keys("cascade:cache:listings:*"),
        cached_pages,
        "a refused write invalidated the listings"
    );
    let (status, body) = get(base, "/listings/acme@1").await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Acme prices")));
    assert_eq!(catalog.count("assets").await, 1);
    assert_eq!(catalog.count("receipts").await, 0);
    assert_eq!(catalog.count("policies").await, 0);
    assert_eq!(catalog.count("lineage_event_audit").await, 0);

    // Mallory's own producer is hers: she publishes under it, and acme's owner cannot touch
    // what she publishes. Unknown producers and versions stay 404 for everyone.
    let (status, body) = send_as(
        base,
        Some(&mallory),
        Method::POST,
        "/producers",
        Some(json!({"producerId": "m", "name": "M"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = get(base, "/listings/m@1").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send_as(
        base,
        Some(&mallory),
        Method::POST,
        "/assets",
        Some(json!({"versionId": "m@1", "producerId": "m", "name": "Mine"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = get(base, "/listings/m@1").await;
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("Mine")),
        "the cached 404 is gone"
    );
    let (status, _) = send(
        base,
        Method::PATCH,
        "/listings/m@1",
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = send(base, Method::DELETE, "/listings/m@1", None).await;
    assert_eq!(status, 403);
    let (status, _) = send_as(
        base,
        Some(&mallory),
        Method::POST,
        "/assets",
        Some(json!({"versionId": "z@1", "producerId": "nobody", "name": "z"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = send_as(
        base,
        Some(&mallory),
        Method::PATCH,
        "/listings/nope",
        Some(json!({"name": "z"})),
    )
    .await;
    assert_eq!(status, 404);
    // Lineage: into someone else's asset, refused; from it into one's own, or into a version
    // not in the catalog, recorded, with who sent it.
    let (status, body) = send_as(
        base,
        Some(&mallory),
        Method::POST,
        "/lineage",
        Some(run_event(&["m@1"], &["acme@1", "unpublished@1"])),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    for outputs in [["m@1"], ["unpublished@1"]] {
        let (status, body) = send_as(
            base,
            Some(&mallory),
            Method::POST,
            "/lineage",
            Some(run_event(&["acme@1"], &outputs)),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let client = catalog.pg.client(&catalog.database).await;
    let senders: Vec<String> = client
        .query(
            "SELECT u.username FROM lineage_event_audit e JOIN cascade_users u \
             ON u.id = e.submitted_by ORDER BY e.event_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(senders, ["mallory", "mallory"]);
    let (_, ready) = get(base, "/ready?versionId=acme@1").await;
    assert_eq!(ready["checked"], 1, "acme@1 gained no parent: {ready}");
}
