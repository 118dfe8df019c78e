//! `GET /listings/{id}` misses that arrive together share one PostgreSQL statement
//! (`queries::assets`, batched by the cache engine): each caller still gets its own asset, or
//! its own 404.

use reqwest::header::AUTHORIZATION;
use serde_json::Value;

use crate::support::{ADMIN_TOKEN, Catalog, get, http};

/// The `assets` namespace's cache counters, from `/health/db`.
async fn asset_counters(base: &str) -> Value {
    let body: Value = http()
        .get(format!("{base}/health/db"))
        .header(AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["cache"]["namespaces"]
        .as_array()
        .and_then(|all| all.iter().find(|ns| ns["namespace"] == "assets"))
        .cloned()
        .unwrap_or_default()
}

fn counter(counters: &Value, field: &str) -> u64 {
    counters[field].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_get_their_own_asset_from_fewer_statements_than_keys() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    let versions: Vec<String> = (0..40).map(|i| format!("batch-{i:02}")).collect();
    for (i, version) in versions.iter().enumerate() {
        catalog
            .asset(version, "acme", &format!("Dataset {i}"))
            .await;
    }
    // Never created: its 404 must not spill over to the others of its batch.
    let absent = "batch-absent".to_string();
    let mut asked = versions.clone();
    asked.insert(17, absent.clone());

    let before = asset_counters(base).await;
    let mut reads = tokio::task::JoinSet::new();
    for version in asked.clone() {
        let base = base.to_string();
        reads.spawn(async move {
            let (status, body) = get(&base, &format!("/listings/{version}")).await;
            (version, status, body)
        });
    }
    let answers = reads.join_all().await;
    let after = asset_counters(base).await;

    for (version, status, body) in &answers {
        if *version == absent {
            assert_eq!(status, &404, "{body}");
            assert_eq!(body["error"]["code"], "not_found", "{body}");
        } else {
            assert_eq!(status, &200, "{version}: {body}");
            assert_eq!(body["versionId"], version.as_str(), "{body}");
            let n: usize = version["batch-".len()..].parse().unwrap();
            assert_eq!(body["name"], format!("Dataset {n}"), "{body}");
        }
    }
    let loads = counter(&after, "loads") - counter(&before, "loads");
    let calls = counter(&after, "loader_calls") - counter(&before, "loader_calls");
    assert_eq!(loads, asked.len() as u64, "one load per key: {after}");
    assert!(
        calls < loads,
        "{calls} statements for {loads} concurrent misses: {after}"
    );

    // Each answer was cached with its key: read again, nothing is loaded, the absent one is
    // still a 404. Except a read that loaded without a lookup (the namespace leaned to misses)
    // whose store was refused (its key was created less than a second before: the creation's
    // tombstone) or came late: that read filled nothing, and its key loads again (counted
    // once its store is answered, after the read's answer). The fills of the
    // reads above land after their answers: give them time first.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for (version, status, _) in &answers {
        let (again, _) = get(base, &format!("/listings/{version}")).await;
        assert_eq!(again, *status, "{version}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let last = asset_counters(base).await;
    let reloaded = counter(&last, "loads") - counter(&after, "loads");
    let unfilled =
        counter(&last, "speculative_unfilled") - counter(&before, "speculative_unfilled");
    assert!(
        reloaded <= unfilled,
        "{reloaded} loads of cached keys: {last}"
    );
}
