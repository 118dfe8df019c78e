//! Input PostgreSQL would refuse (a NUL, an offset past ±15:59), ids outside the documented
//! character set and bodies that are not JSON: each a 4xx naming what is wrong, refused before
//! anything reaches PostgreSQL, so nothing is written and nothing is a 500.

use reqwest::Method;
use reqwest::header;
use serde_json::{Value, json};

use crate::support::{Catalog, assert_bad_field, get, http, run_event, send};

/// What the refused requests below could have written, counted straight from PostgreSQL.
async fn rows(catalog: &Catalog) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "producers",
        "assets",
        "receipts",
        "policies",
        "lineage_event_audit",
        "lineage_edges",
        "lineage_pending_edges",
    ] {
        counts.push(catalog.count(table).await);
    }
    counts
}

#[tokio::test]
async fn nul_characters_and_out_of_range_offsets_are_refused_naming_the_field() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a@1", "acme", "A").await;
    let before = rows(&catalog).await;

    // Reads: each used to reach PostgreSQL and come back as a 500.
    for (query, field) in [
        ("/listings?q=rain%00fall", "q"),
        ("/listings?cursor=1738324800000000.a%00b", "cursor"),
        ("/listings?producer=ac%00me", "producer"),
        (
            "/listings?createdAfter=2025-01-31T12:00:00%2B16:00",
            "createdAfter",
        ),
        (
            "/listings?createdBefore=2025-01-31T12:00:00-16:00",
            "createdBefore",
        ),
        ("/listings?cursor=9223372036854775807.a", "cursor"),
        ("/listings/a%00b", "versionId"),
        ("/bundle?versionId=a%00b", "versionId"),
        ("/ready?versionId=a%00b", "versionId"),
    ] {
        let (status, body) = get(base, query).await;
        assert_bad_field(status, &body, field);
    }

    let nul = "x\u{0}y";
    let mut cases: Vec<(Method, &str, Value, &str)> = vec![
        (
            Method::POST,
            "/producers",
            json!({"producerId": "p", "name": nul}),
            "name",
        ),
        (
            Method::POST,
            "/producers",
            json!({"producerId": nul, "name": "P"}),
            "producerId",
        ),
        (
            Method::POST,
            "/assets",
            json!({"versionId": nul, "producerId": "acme", "name": "n"}),
            "versionId",
        ),
        (
            Method::POST,
            "/assets",
            json!({"versionId": "b@1", "producerId": "acme", "name": "n",
                   "metadata": {"description": nul}}),
            "metadata",
        ),
        (
            Method::POST,
            "/assets",
            json!({"versionId": "b@1", "producerId": "acme", "name": "n",
                   "metadata": {"tags": [{"k\u{0}": 1}]}}),
            "metadata",
        ),
        (
            Method::PATCH,
            "/listings/a@1",
            json!({"metadata": {"nested": {"deep": [nul]}}}),
            "metadata",
        ),
        (
            Method::POST,
            "/receipts",
            json!({"versionId": "a@1", "payer": nul, "amount": 1}),
            "payer",
        ),
        (
            Method::POST,
            "/receipts",
            json!({"versionId": "a@1", "payer": "p", "amount": 1,
                   "expiresAt": "2999-01-01T00:00:00+16:00"}),
            "expiresAt",
        ),
        (
            Method::POST,
            "/policies",
            json!({"versionId": "a@1", "document": {"license": nul}}),
            "document",
        ),
        (
            Method::POST,
            "/policies",
            json!({"versionId": "a@1", "document": {},
                   "expiresAt": "2999-01-01T00:00:00-16:00"}),
            "expiresAt",
        ),
    ];
    let mut event = run_event(&["in"], &["out"]);
    event["producer"] = json!(nul);
    cases.push((Method::POST, "/lineage", event, "producer"));
    let mut event = run_event(&["in"], &["out"]);
    event["job"]["name"] = json!(nul);
    cases.push((Method::POST, "/lineage", event, "job.name"));
    let mut event = run_event(&["in"], &["out"]);
    event["run"]["facets"] = json!({"nominal\u{0}Time": {}});
    cases.push((
        Method::POST,
        "/lineage",
        event,
        "run.facets.nominal\\u0000Time",
    ));
    let mut event = run_event(&["in"], &["out"]);
    event["inputs"][0]["name"] = json!(nul);
    cases.push((Method::POST, "/lineage", event, "inputs[0].name"));
    let mut event = run_event(&["in"], &["out"]);
    event["eventTime"] = json!("2025-01-31T12:00:00+16:00");
    cases.push((Method::POST, "/lineage", event, "eventTime"));

    for (method, path, request, field) in cases {
        let (status, body) = send(base, method.clone(), path, Some(request)).await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert_bad_field(status, &body, field);
    }
    assert_eq!(rows(&catalog).await, before, "refused writes wrote nothing");
    let (_, asset) = get(base, "/listings/a@1").await;
    assert_eq!(asset["metadata"], json!({"description": "about A"}));
}

#[tokio::test]
async fn ids_are_restricted_to_the_documented_character_set() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    let before = rows(&catalog).await;
    // A right-to-left override makes "cod.exe" display as "exe.doc"; a zero-width space
    // makes two ids that look the same.
    for spoof in [
        "invoice\u{202e}cod.exe",
        "acme\u{200b}",
        "caf\u{e9}",
        "a b",
        "a?b",
    ] {
        for (path, request, field) in [
            (
                "/assets",
                json!({"versionId": spoof, "producerId": "acme", "name": "n"}),
                "versionId",
            ),
            (
                "/producers",
                json!({"producerId": spoof, "name": "n"}),
                "producerId",
            ),
            ("/lineage", run_event(&[spoof], &["out"]), "inputs"),
            ("/lineage", run_event(&["in"], &[spoof]), "outputs"),
        ] {
            let (status, body) = send(base, Method::POST, path, Some(request)).await;
            assert_bad_field(status, &body, field);
        }
    }
    let (status, body) = get(base, "/listings/invoice%E2%80%AEcod.exe").await;
    assert_bad_field(status, &body, "versionId");
    assert_eq!(rows(&catalog).await, before);
    // What the README documents is accepted.
    catalog
        .asset("s3://lake/orders.csv:v=2+b~c_d@3", "acme", "ok")
        .await;
}

#[tokio::test]
async fn a_write_whose_body_is_not_json_is_415_and_writes_nothing() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a@1", "acme", "A").await;
    let token = crate::support::register(base, "writer").await;
    let before = rows(&catalog).await;
    let asset = json!({"versionId": "b@1", "producerId": "acme", "name": "B"});
    let writes = [
        (
            Method::POST,
            "/producers",
            json!({"producerId": "w", "name": "W"}),
        ),
        (Method::POST, "/assets", asset),
        (Method::PATCH, "/listings/a@1", json!({"name": "changed"})),
        (
            Method::POST,
            "/receipts",
            json!({"versionId": "a@1", "payer": "p", "amount": 1}),
        ),
        (
            Method::POST,
            "/policies",
            json!({"versionId": "a@1", "document": {}}),
        ),
        (Method::POST, "/lineage", run_event(&["x"], &["y"])),
    ];
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        for (method, path, request) in &writes {
            let mut builder = http()
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&token)
                .body(request.to_string());
            if let Some(content_type) = content_type {
                builder = builder.header(header::CONTENT_TYPE, content_type);
            }
            let response = builder.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 415, "{method} {path} as {content_type:?}: {body}");
            assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
        }
    }
    assert_eq!(rows(&catalog).await, before);
    let (_, asset) = get(base, "/listings/a@1").await;
    assert_eq!(asset["name"], "A");
}
