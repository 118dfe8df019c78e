use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{self, Catalog, assert_bad_field, get, send};

fn ancestors(bundle: &Value) -> Vec<(String, u64)> {
    support::ancestors(bundle, "/depth")
        .into_iter()
        .map(|(v, d)| (v, d.as_u64().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_bundle_is_the_asset_with_its_ancestry_to_the_requested_depth() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    for v in ["raw", "clean", "features", "model"] {
        catalog.asset(v, "acme", v).await;
    }
    // raw → clean → features → model, and an input the catalog does not have.
    catalog.lineage(&["raw"], &["clean"]).await;
    catalog.lineage(&["clean", "external"], &["features"]).await;
    catalog.lineage(&["features"], &["model"]).await;

    let (status, bundle) = get(base, "/bundle?versionId=model&depth=2").await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["asset"]["versionId"], "model");
    assert_eq!(
        ancestors(&bundle),
        [
            ("features".to_string(), 1),
            ("clean".to_string(), 2),
            ("external".to_string(), 2)
        ]
    );
    let external = &bundle["ancestors"][2];
    assert!(
        external["asset"].is_null(),
        "not in the catalog: {external}"
    );
    assert_eq!(bundle["edges"].as_array().unwrap().len(), 3);

    let (_, bundle) = get(base, "/bundle?versionId=model&depth=10").await;
    assert_eq!(ancestors(&bundle).len(), 4);
    let (_, bundle) = get(base, "/bundle?versionId=model&depth=0").await;
    assert!(ancestors(&bundle).is_empty());
    let (_, bundle) = get(base, "/bundle?versionId=model").await;
    assert_eq!(bundle["depth"], 3, "default depth");

    for query in [
        "versionId=model&depth=11",
        "versionId=model&depth=-1",
        "versionId=model&depth=x",
    ] {
        let (status, body) = get(base, &format!("/bundle?{query}")).await;
        assert_bad_field(status, &body, "depth");
    }
    let (status, body) = get(base, "/bundle?depth=1").await;
    assert_bad_field(status, &body, "versionId");
    let (status, _) = get(base, "/bundle?versionId=ghost").await;
    assert_eq!(status, 404);
    let (status, _) = get(base, "/bundle?versionId=external").await;
    assert_eq!(
        status, 404,
        "a version only named by lineage is not an asset"
    );
}

#[tokio::test]
async fn bundles_bypass_the_cache_when_use_redis_bundles_is_false_and_stay_correct() {
    let catalog = Catalog::start_with(1, &[("USE_REDIS_BUNDLES", "false".into())]).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a", "acme", "A").await;
    catalog.asset("b", "acme", "B").await;
    let (_, bundle) = get(base, "/bundle?versionId=b&depth=1").await;
    assert!(ancestors(&bundle).is_empty());
    catalog.lineage(&["a"], &["b"]).await;
    let (_, bundle) = get(base, "/bundle?versionId=b&depth=1").await;
    assert_eq!(ancestors(&bundle), [("a".to_string(), 1)]);
    // Nothing of bundles reached Redis, while asset details still did.
    get(base, "/listings/b").await;
    assert_eq!(catalog.redis_keys("*bundle*"), Vec::<String>::new());
    assert_eq!(
        catalog.redis_keys("cascade:cache:asset:*"),
        ["cascade:cache:asset:b"]
    );
}

#[tokio::test]
async fn cache_entries_carry_the_seeds_key_names() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("a", "acme", "A").await;
    catalog.asset("b", "acme", "B").await;
    catalog.lineage(&["a"], &["b"]).await;
    for path in [
        "/listings/b",
        "/listings?producer=acme",
        "/bundle?versionId=b&depth=2",
        "/ready?versionId=b",
    ] {
        assert_eq!(get(base, path).await.0, 200, "{path}");
    }
    // Seed 003's keyspace (`cache:asset:<versionId>`, `cache:listings:<params>`,
    // `bundle:<versionId>:<depth>`) under the configured prefix.
    assert_eq!(
        catalog.redis_keys("cascade:cache:asset:*"),
        ["cascade:cache:asset:b"]
    );
    assert_eq!(catalog.redis_keys("cascade:cache:listings:*").len(), 1);
    assert_eq!(
        catalog.redis_keys("cascade:bundle:*"),
        ["cascade:bundle:b:2"]
    );
    assert_eq!(catalog.redis_keys("cascade:ready:*"), ["cascade:ready:b"]);
}

#[tokio::test]
async fn a_rename_reaches_the_deepest_bundle_that_shows_it() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    // v0 <- v1 <- ... <- v10: v0 is in v10's bundle at the deepest depth a bundle has.
    for i in 0..=10 {
        let version = format!("v{i}");
        catalog.asset(&version, "acme", &version).await;
        if i > 0 {
            catalog
                .lineage(&[&format!("v{}", i - 1)], &[&version])
                .await;
        }
    }
    let path = "/bundle?versionId=v10&depth=10";
    let name_of_v0 = |bundle: &Value| {
        bundle["ancestors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["versionId"] == "v0")
            .map(|a| a["asset"]["name"].clone())
    };
    let (_, bundle) = get(base, path).await;
    assert_eq!(name_of_v0(&bundle), Some(json!("v0")), "{bundle}");
    let (status, _) = send(
        base,
        Method::PATCH,
        "/listings/v0",
        Some(json!({"name": "renamed"})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, bundle) = get(base, path).await;
    assert_eq!(name_of_v0(&bundle), Some(json!("renamed")), "{bundle}");
}

/// The name `bundle` shows for `version`, wherever it is in it.
fn name_in(bundle: &Value, version: &str) -> Option<Value> {
    if bundle["versionId"] == version {
        return Some(bundle["asset"]["name"].clone());
    }
    bundle["ancestors"]
        .as_array()?
        .iter()
        .find(|a| a["versionId"] == version)
        .map(|a| a["asset"]["name"].clone())
}

#[tokio::test]
async fn a_rename_reaches_a_bundle_through_lineage_added_after_it_was_cached() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    for version in ["a", "b", "c", "late"] {
        catalog.asset(version, "acme", version).await;
    }
    catalog.lineage(&["a"], &["b"]).await;
    catalog.lineage(&["b"], &["c"]).await;
    let path = "/bundle?versionId=c&depth=3";
    let (_, bundle) = get(base, path).await;
    assert_eq!(name_in(&bundle, "late"), None, "{bundle}");
    // A new parent of `a`: the cached bundle of `c` (and the versions it shows) must go, and
    // the next one, cached again, must follow renames of the new ancestor too.
    catalog.lineage(&["late"], &["a"]).await;
    let (_, bundle) = get(base, path).await;
    assert_eq!(name_in(&bundle, "late"), Some(json!("late")), "{bundle}");
    // Cached again, under the versions it shows now (a bundle whose versions changed
    // between their read and its load is answered uncached).
    assert_eq!(
        catalog.redis_keys("cascade:bundle:*"),
        ["cascade:bundle:c:3"]
    );
    for (version, name) in [
        ("late", "late-renamed"),
        ("a", "a-renamed"),
        ("c", "c-renamed"),
    ] {
        let (status, _) = send(
            base,
            Method::PATCH,
            &format!("/listings/{version}"),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, 200);
        let (_, bundle) = get(base, path).await;
        assert_eq!(name_in(&bundle, version), Some(json!(name)), "{bundle}");
    }
}

#[tokio::test]
async fn a_rename_reaches_a_bundle_that_shows_more_versions_than_are_tagged_one_by_one() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    // 300 parents of `child`: its depth-1 bundle shows 301 versions, past the 256 it is
    // tagged with one by one.
    let parents: Vec<String> = (0..300).map(|i| format!("parent-{i:03}")).collect();
    let inputs: Vec<&str> = parents.iter().map(String::as_str).collect();
    for parent in &inputs {
        catalog.asset(parent, "acme", parent).await;
    }
    catalog.asset("child", "acme", "child").await;
    catalog.lineage(&inputs, &["child"]).await;
    let path = "/bundle?versionId=child&depth=1";
    let (_, bundle) = get(base, path).await;
    assert_eq!(bundle["ancestors"].as_array().unwrap().len(), 300);
    let (status, _) = send(
        base,
        Method::PATCH,
        "/listings/parent-150",
        Some(json!({"name": "renamed"})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, bundle) = get(base, path).await;
    assert_eq!(name_in(&bundle, "parent-150"), Some(json!("renamed")));
}
