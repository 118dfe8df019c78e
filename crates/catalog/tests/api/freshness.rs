//! A write is visible on the very next read, on every instance, while other clients keep the
//! affected keys hot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::http;
use crate::support::{self, Catalog, get, send};

/// Reads that keep every affected key hot on every instance, in bounded loops, until stopped.
struct Hammer {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Hammer {
    fn start(bases: &[String], paths: &[&str]) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for base in bases {
            for path in paths {
                let (stop, reads) = (stop.clone(), reads.clone());
                let url = format!("{base}{path}");
                tasks.push(tokio::spawn(async move {
                    let client = http();
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Ok(response) = client.get(&url).send().await {
                            let _ = response.bytes().await;
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        // Paced, not synchronising: hot keys without starving a 2-core machine.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }));
            }
        }
        Hammer { stop, reads, tasks }
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.reads.load(Ordering::Relaxed)
    }
}

fn names_in_bundle(bundle: &Value) -> Vec<(String, Value)> {
    support::ancestors(bundle, "/asset/name")
}

#[tokio::test]
async fn writes_are_visible_on_the_next_read_on_both_instances_while_keys_are_hot() {
    let catalog = Catalog::start(2).await;
    let bases: Vec<String> = catalog.servers.iter().map(|s| s.base.clone()).collect();
    let (writer, other) = (bases[0].as_str(), bases[1].as_str());
    catalog.producer("acme").await;
    for v in ["a", "b", "c"] {
        catalog.asset(v, "acme", &format!("name {v}")).await;
        catalog.entitle(v).await;
    }
    catalog.lineage(&["a"], &["b"]).await;
    catalog.lineage(&["b"], &["c"]).await;

    let hot = [
        "/listings/a",
        "/listings/b",
        "/listings?limit=10",
        "/listings?q=renamed",
        "/bundle?versionId=c&depth=3",
        "/ready?versionId=c",
    ];
    let hammer = Hammer::start(&bases, &hot);
    // Every key is cached on both instances before the first write.
    for base in &bases {
        for path in hot {
            let (status, _) = get(base, path).await;
            assert_eq!(status, 200, "{base}{path}");
        }
    }

    for round in 0..3 {
        // 1. Rename an ancestor: its details, the listings, the bundle and search change.
        let name = format!("renamed {round}");
        let (status, _) = send(
            writer,
            Method::PATCH,
            "/listings/a",
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, 200);
        for base in [other, writer] {
            let (_, asset) = get(base, "/listings/a").await;
            assert_eq!(asset["name"], name, "{base}: asset details");
            let (_, page) = get(base, "/listings?limit=10").await;
            let listed = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["versionId"] == "a");
            assert_eq!(listed.unwrap()["name"], name, "{base}: listing");
            let (_, found) = get(base, "/listings?q=renamed").await;
            assert_eq!(found["items"][0]["name"], name, "{base}: search");
            let (_, bundle) = get(base, "/bundle?versionId=c&depth=3").await;
            assert_eq!(
                names_in_bundle(&bundle)[..2],
                [("b".into(), json!("name b")), ("a".into(), json!(name))],
                "{base}: bundle"
            );
        }

        // 2. A new ancestor from lineage: bundle and readiness of the grandchild change.
        let upstream = format!("up{round}");
        catalog.lineage(&[&upstream], &["a"]).await;
        for base in [other, writer] {
            let (_, bundle) = get(base, "/bundle?versionId=c&depth=3").await;
            assert!(
                names_in_bundle(&bundle).contains(&(upstream.clone(), Value::Null)),
                "{base}: bundle after lineage: {bundle}"
            );
            let (_, ready) = get(base, "/ready?versionId=c").await;
            assert_eq!(ready["ready"], false, "{base}: {ready}");
            assert_eq!(
                ready["missing"][0]["versionId"],
                upstream.as_str(),
                "{base}"
            );
        }

        // 3. The ancestor is published and entitled: readiness comes back.
        catalog.asset(&upstream, "acme", "upstream").await;
        for base in [other, writer] {
            let (_, ready) = get(base, "/ready?versionId=c").await;
            assert_eq!(
                ready["missing"][0]["missing"],
                json!(["receipt", "policy"]),
                "{base}"
            );
        }
        catalog.entitle(&upstream).await;
        for base in [other, writer] {
            let (_, ready) = get(base, "/ready?versionId=c").await;
            assert_eq!(ready["ready"], true, "{base}: {ready}");
        }
    }

    // 4. Deleting a version: 404 everywhere, gone from listings, missing from readiness.
    let (status, _) = send(other, Method::DELETE, "/listings/b", None).await;
    assert_eq!(status, 204);
    for base in [writer, other] {
        let (status, _) = get(base, "/listings/b").await;
        assert_eq!(status, 404, "{base}");
        let (_, page) = get(base, "/listings?limit=10").await;
        assert!(
            !page["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["versionId"] == "b")
        );
        let (_, ready) = get(base, "/ready?versionId=c").await;
        assert_eq!(ready["missing"][0]["versionId"], "b", "{base}: {ready}");
        let (_, bundle) = get(base, "/bundle?versionId=c&depth=3").await;
        assert_eq!(
            bundle["ancestors"][0]["asset"],
            Value::Null,
            "{base}: {bundle}"
        );
    }

    let reads = hammer.stop().await;
    assert!(reads > 0, "the readers ran");
    // The reads above were served from the cache, not only from PostgreSQL.
    for served in &catalog.servers {
        let (_, health) = support::send_as(
            &served.base,
            Some(support::ADMIN_TOKEN),
            Method::GET,
            "/health/db",
            None,
        )
        .await;
        let hits: u64 = health["cache"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|ns| {
                ["assets", "bundles", "ready", "listings"]
                    .contains(&ns["namespace"].as_str().unwrap())
            })
            .map(|ns| ns["near_hits"].as_u64().unwrap() + ns["shared_hits"].as_u64().unwrap())
            .sum();
        assert!(hits > 0, "{health}");
    }
}

#[tokio::test]
async fn a_change_above_many_descendants_still_reaches_every_cached_bundle() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("root", "acme", "before").await;
    // More descendants than are invalidated one by one: the whole namespaces go instead.
    // Published first: lineage into a version not in the catalog stays pending until then.
    let children: Vec<String> = (0..300).map(|i| format!("child-{i:03}")).collect();
    let outputs: Vec<&str> = children.iter().map(String::as_str).collect();
    for child in &outputs {
        catalog.asset(child, "acme", child).await;
    }
    catalog.lineage(&["root"], &outputs).await;
    for child in &outputs[..3] {
        let (_, bundle) = get(base, &format!("/bundle?versionId={child}&depth=1")).await;
        assert_eq!(bundle["ancestors"][0]["asset"]["name"], "before");
    }
    let (status, _) = send(
        base,
        Method::PATCH,
        "/listings/root",
        Some(json!({"name": "after"})),
    )
    .await;
    assert_eq!(status, 200);
    for child in &outputs[..3] {
        let (_, bundle) = get(base, &format!("/bundle?versionId={child}&depth=1")).await;
        assert_eq!(bundle["ancestors"][0]["asset"]["name"], "after", "{child}");
    }
}
