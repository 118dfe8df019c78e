//! Catalog writes leave one audit row each (`cascade_core::audit`), in their own transaction
//! or statement, with the entity before and after, the account and the request id; refused
//! writes leave none.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Catalog, http, register, send, send_as};

/// The audit rows about `entity_type`/`entity_id`, oldest first:
/// `(actor, action, before, after, request_id)`.
async fn rows(
    catalog: &Catalog,
    entity_type: &str,
    entity_id: &str,
) -> Vec<(String, String, Option<Value>, Option<Value>, Option<String>)> {
    let client = catalog.pg.client(&catalog.database).await;
    client
        .query(
            "SELECT actor, action, before, after, request_id FROM audit_log \
             WHERE entity_type = $1 AND entity_id = $2 ORDER BY id",
            &[&entity_type, &entity_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// The publisher's account id, from its audit rows' actor.
async fn publisher(catalog: &Catalog) -> String {
    let client = catalog.pg.client(&catalog.database).await;
    let id: i64 = client
        .query_one(
            "SELECT id FROM cascade_users WHERE username = 'publisher'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    format!("user:{id}")
}

#[tokio::test]
async fn each_catalog_write_leaves_one_row_with_before_and_after() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    let actor = publisher(&catalog).await;
    catalog.producer("acme").await;
    let produced = rows(&catalog, "producer", "acme").await;
    assert_eq!(produced.len(), 1, "{produced:?}");
    assert_eq!(
        (produced[0].0.as_str(), produced[0].1.as_str()),
        (actor.as_str(), "producer.create")
    );
    assert_eq!(produced[0].3.as_ref().unwrap()["producerId"], "acme");

    catalog.asset("ds-1", "acme", "Orders").await;
    // The PATCH is one statement, and writes its row in it; the request id is kept.
    let token = crate::support::publisher_token(base).expect("the publisher");
    let response = http()
        .patch(format!("{base}/listings/ds-1"))
        .bearer_auth(&token)
        .header("x-request-id", "req-rename-1")
        .json(&json!({"name": "Orders, renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, _) = send(base, Method::DELETE, "/listings/ds-1", None).await;
    assert_eq!(status, 204);

    let trail = rows(&catalog, "asset", "ds-1").await;
    let actions: Vec<&str> = trail.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(actions, ["asset.create", "asset.update", "asset.delete"]);
    assert!(trail.iter().all(|r| r.0 == actor), "{trail:?}");
    let (_, _, before, after, _) = &trail[0];
    assert_eq!(before, &None);
    assert_eq!(after.as_ref().unwrap()["name"], "Orders");
    let (_, _, before, after, request_id) = &trail[1];
    assert_eq!(before.as_ref().unwrap()["name"], "Orders");
    assert_eq!(after.as_ref().unwrap()["name"], "Orders, renamed");
    assert_eq!(request_id.as_deref(), Some("req-rename-1"));
    let (_, _, before, after, _) = &trail[2];
    assert_eq!(before.as_ref().unwrap()["name"], "Orders, renamed");
    assert_eq!(after, &None);

    catalog.asset("ds-2", "acme", "Clean orders").await;
    catalog.entitle("ds-2").await;
    catalog.lineage(&["ds-1"], &["ds-2"]).await;
    let (status, _) = send(
        base,
        Method::DELETE,
        "/lineage?child=ds-2&parent=ds-1",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let client = catalog.pg.client(&catalog.database).await;
    let actions: Vec<String> = client
        .query(
            "SELECT action FROM audit_log WHERE entity_type IN \
               ('receipt', 'policy', 'lineage_event', 'lineage_edge') ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        actions,
        [
            "receipt.create",
            "policy.create",
            "lineage.record",
            "lineage.delete"
        ]
    );
}

/// Ids may be longer than the audit log's `entity_id` (200 characters): recorded shortened
/// (a fuzz finding: the write was a 500).
#[tokio::test]
async fn writes_of_the_longest_ids_are_audited_under_a_shortened_id() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    let long = "p".repeat(256);
    catalog.producer(&long).await;
    let version = "v".repeat(256);
    catalog.asset(&version, &long, "Long").await;
    let (status, body) = send(
        base,
        Method::PATCH,
        &format!("/listings/{version}"),
        Some(json!({"name": "Longer"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let client = catalog.pg.client(&catalog.database).await;
    let found: Vec<(String, String)> = client
        .query(
            "SELECT action, after ->> 'versionId' FROM audit_log \
             WHERE entity_type = 'asset' AND entity_id LIKE $1 ORDER BY id",
            &[&format!("{}~%", "v".repeat(160))],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        found,
        [
            ("asset.create".to_string(), version.clone()),
            ("asset.update".to_string(), version.clone()),
        ]
    );
}

#[tokio::test]
async fn a_refused_catalog_write_leaves_no_row() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("ds-1", "acme", "Orders").await;
    let before = catalog.count("audit_log").await;
    let intruder = register(base, "intruder").await;
    let patch = Some(json!({"name": "Mine now"}));
    for (status, method, path, body, token) in [
        // 400: a malformed change.
        (
            400,
            Method::PATCH,
            "/listings/ds-1",
            Some(json!({"name": 7})),
            None,
        ),
        // 404: no such asset (one statement: refused inside it).
        (404, Method::PATCH, "/listings/ds-404", patch.clone(), None),
        // 403: another account's asset.
        (
            403,
            Method::PATCH,
            "/listings/ds-1",
            patch.clone(),
            Some(&intruder),
        ),
        (403, Method::DELETE, "/listings/ds-1", None, Some(&intruder)),
        (404, Method::DELETE, "/listings/ds-404", None, None),
        // 409: the version exists (the insert fails in the transaction).
        (
            409,
            Method::POST,
            "/assets",
            Some(json!({"versionId": "ds-1", "producerId": "acme", "name": "Again"})),
            None,
        ),
        (
            409,
            Method::POST,
            "/producers",
            Some(json!({"producerId": "acme", "name": "Again"})),
            None,
        ),
        (
            404,
            Method::POST,
            "/receipts",
            Some(json!({"versionId": "ds-404", "payer": "x", "amount": 1})),
            None,
        ),
    ] {
        let (got, answer) = match token {
            Some(token) => send_as(base, Some(token), method.clone(), path, body).await,
            None => send(base, method.clone(), path, body).await,
        };
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(
            catalog.count("audit_log").await,
            before,
            "{method} {path} wrote an audit row"
        );
    }
}
