//! `GET /listings/{id}` builds its body in the server from the row's columns
//! (`queries::asset_body`), where other reads (pages, bundles) have PostgreSQL build the same
//! object with `json_build_object`: both must give the same bytes for every row PostgreSQL can
//! hold, or one asset would have two ETags and two spellings.

use crate::support::{Catalog, http};
use cascade_catalog::queries::{ASSET_JSON, compact};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_built_by_the_server_is_the_one_postgresql_builds() {
    let catalog = Catalog::start(1).await;
    catalog.producer("acme").await;
    let client = catalog.pg.client(&catalog.database).await;
    // PostgreSQL's own spelling of an asset (the catalog's `asset_json!`, which pages and
    // bundles use), compacted as every body is.
    let postgres_built = format!("SELECT {ASSET_JSON}::text FROM assets a WHERE a.version_id = $1");
    // (name, metadata, created_at, updated_at): every escape PostgreSQL's escape_json makes,
    // text it leaves alone, jsonb's own spelling of numbers and keys, and times across the
    // range timestamptz holds (before the Unix and PostgreSQL epochs, past year 9999, BC,
    // infinite).
    let rows: [(&str, &str, &str, &str); 8] = [
        (
            "quote \" backslash \\ slash / tab \t newline \n return \r",
            r#"{"description": "plain", "n": 1.50, "big": 1e3, "list": [1, "two", null, true], "nested": {"b": {}, "a": []}}"#,
            "2026-12-06 12:00:00.123456+00",
            "2026-12-06 12:00:01+00",
        ),
        (
            "\u{1}\u{8}\u{c}\u{1f} del \u{7f} é 日本 😀 </script> \u{2028}",
            r#"{"key with \"quotes\"": "value\twith\u0001controls\\", "": ""}"#,
            "1969-12-31 23:59:59.5+00",
            "2000-01-01 00:00:00+00",
        ),
        (
            "",
            "{}",
            "0001-01-01 00:00:00+00",
            "9999-12-31 23:59:59.999999+00",
        ),
        (
            "past 9999",
            "[]",
            "12000-06-01 08:30:00+00",
            "294276-12-31 23:59:59.999999+00",
        ),
        (
            "before Christ",
            "\"a string\"",
            "0044-03-15 12:00:00+00 BC",
            "4714-11-24 00:00:00+00 BC",
        ),
        ("infinite", "-0.0", "infinity", "-infinity"),
        (
            "offset",
            "12345678901234567890",
            "2026-03-29 01:30:00+02",
            "1999-12-31 23:59:59.999999-05",
        ),
        (
            "leap",
            "{\"a\": 1, \"a\": 2}",
            "2024-02-29 23:59:59.999999+00",
            "2000-02-29 00:00:00+00",
        ),
    ];
    let mut versions = Vec::new();
    for (i, (name, metadata, created, updated)) in rows.iter().enumerate() {
        let version = format!("body-{i}");
        client
            .execute(
                "INSERT INTO assets (version_id, producer_id, name, metadata, created_at, updated_at) \
                 VALUES ($1, 'acme', $2, $3::text::jsonb, $4::text::timestamptz, $5::text::timestamptz)",
                &[&version, name, metadata, created, updated],
            )
            .await
            .unwrap();
        versions.push(version);
    }
    // Read together (one batched statement, `queries::assets`), then each again (from the
    // cache: the bytes stored are the ones loaded).
    for _ in 0..2 {
        let mut reads = tokio::task::JoinSet::new();
        for version in versions.clone() {
            let url = format!("{}/listings/{version}", catalog.base());
            reads.spawn(async move {
                let answer = http().get(url).send().await.unwrap();
                assert_eq!(answer.status(), 200, "{version}");
                (version, answer.bytes().await.unwrap())
            });
        }
        for (version, served) in reads.join_all().await {
            let row = client
                .query_one(&postgres_built, &[&version])
                .await
                .unwrap();
            let expected = compact(row.get::<_, &str>(0));
            assert_eq!(
                String::from_utf8_lossy(&served),
                String::from_utf8_lossy(&expected),
                "{version}"
            );
            assert!(serde_json::from_slice::<serde_json::Value>(&served).is_ok());
        }
    }
}
