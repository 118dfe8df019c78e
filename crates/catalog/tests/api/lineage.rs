use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::support::{
    Catalog, ancestors, assert_bad_field, get, register, run_event, send, send_as,
};

#[tokio::test]
async fn an_openlineage_event_records_edges_from_inputs_to_outputs() {
    let catalog = Catalog::start(1).await;
    catalog.producer("acme").await;
    for v in ["c", "y@42"] {
        catalog.asset(v, "acme", v).await;
    }
    let answer = catalog.lineage(&["a", "b"], &["c"]).await;
    assert_eq!(
        answer["edgesAdded"],
        json!([{"parent": "a", "child": "c"}, {"parent": "b", "child": "c"}])
    );
    // The same event again adds nothing new but is audited.
    let answer = catalog.lineage(&["a", "b"], &["c"]).await;
    assert_eq!(answer["edgesAdded"], json!([]));
    assert_eq!(catalog.count("lineage_event_audit").await, 2);
    assert_eq!(catalog.count("lineage_edges").await, 2);

    // The dataset-version facet names the version when present.
    let mut event = run_event(&["x"], &["y"]);
    event["outputs"][0]["facets"] = json!({"version": {"datasetVersion": "y@42"}});
    let (status, answer) = send(catalog.base(), Method::POST, "/lineage", Some(event)).await;
    assert_eq!(status, 201);
    assert_eq!(
        answer["edgesAdded"],
        json!([{"parent": "x", "child": "y@42"}])
    );
}

#[tokio::test]
async fn a_malformed_event_is_refused_naming_the_field_and_writes_nothing() {
    let catalog = Catalog::start(1).await;
    type Breakage = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Breakage)> = vec![
        (
            "eventTime",
            Box::new(|e| {
                e.as_object_mut().unwrap().remove("eventTime");
            }),
        ),
        (
            "eventTime",
            Box::new(|e| e["eventTime"] = json!("last tuesday")),
        ),
        (
            // Well-formed, but no such day: refused by PostgreSQL, still named.
            "eventTime",
            Box::new(|e| e["eventTime"] = json!("2025-02-30T12:00:00Z")),
        ),
        (
            "eventType",
            Box::new(|e| e["eventType"] = json!("FINISHED")),
        ),
        (
            "producer",
            Box::new(|e| {
                e.as_object_mut().unwrap().remove("producer");
            }),
        ),
        ("schemaURL", Box::new(|e| e["schemaURL"] = json!(7))),
        (
            "run.runId",
            Box::new(|e| e["run"]["runId"] = json!("run-1")),
        ),
        (
            "job.name",
            Box::new(|e| {
                e["job"].as_object_mut().unwrap().remove("name");
            }),
        ),
        ("job.namespace", Box::new(|e| e["job"] = json!("etl"))),
        ("inputs", Box::new(|e| e["inputs"] = json!("a"))),
        (
            "outputs",
            Box::new(|e| e["outputs"][0] = json!({"namespace": "s3"})),
        ),
    ];
    for (field, break_it) in cases {
        let mut event = run_event(&["a"], &["b"]);
        break_it(&mut event);
        let (status, body) = send(catalog.base(), Method::POST, "/lineage", Some(event)).await;
        assert_bad_field(status, &body, field);
    }
    let (status, _) = send(catalog.base(), Method::POST, "/lineage", Some(json!("x"))).await;
    assert_eq!(status, 400);
    assert_eq!(catalog.count("lineage_event_audit").await, 0);
    assert_eq!(catalog.count("lineage_edges").await, 0);
}

#[tokio::test]
async fn lineage_cycles_do_not_loop() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    for v in ["a", "b", "c"] {
        catalog.asset(v, "acme", v).await;
        catalog.entitle(v).await;
    }
    // a → b → c → a, and b → a: cycles of length 3 and 2.
    catalog.lineage(&["a"], &["b"]).await;
    catalog.lineage(&["b"], &["c"]).await;
    catalog.lineage(&["c"], &["a"]).await;
    catalog.lineage(&["b"], &["a"]).await;

    let started = Instant::now();
    let (status, bundle) = get(base, "/bundle?versionId=a&depth=10").await;
    assert_eq!(status, 200, "{bundle}");
    let mut members: Vec<&str> = bundle["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["versionId"].as_str().unwrap())
        .collect();
    members.sort_unstable();
    // `a` is its own ancestor through the cycles, but each version appears once, at its
    // shortest distance: `a` as the asset itself.
    assert_eq!(members, ["b", "c"]);
    let (status, ready) = get(base, "/ready?versionId=a").await;
    assert_eq!(
        (status, ready["ready"].as_bool()),
        (200, Some(true)),
        "{ready}"
    );
    assert_eq!(ready["checked"], 3);
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn an_event_implying_too_many_edges_is_refused_at_once_and_writes_nothing() {
    let catalog = Catalog::start(1).await;
    let names = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    };
    let (inputs, outputs) = (names("in", 1_001), names("out", 1_000));
    // 1,000 × 1,000 would be a million edges; it used to be deduplicated by a linear scan on
    // a worker thread before anything else happened.
    let started = Instant::now();
    let (status, body) = send(
        catalog.base(),
        Method::POST,
        "/lineage",
        Some(run_event(&refs(&inputs[..1_000]), &refs(&outputs))),
    )
    .await;
    assert_bad_field(status, &body, "outputs");
    let (status, body) = send(
        catalog.base(),
        Method::POST,
        "/lineage",
        Some(run_event(&refs(&inputs), &refs(&outputs[..1]))),
    )
    .await;
    assert_bad_field(status, &body, "inputs");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        started.elapsed()
    );
    // Within the dataset bound but over the edge bound: 100 × 11.
    let (status, body) = send(
        catalog.base(),
        Method::POST,
        "/lineage",
        Some(run_event(&refs(&inputs[..100]), &refs(&outputs[..11]))),
    )
    .await;
    assert_bad_field(status, &body, "outputs");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 edges"),
        "{body}"
    );
    assert_eq!(catalog.count("lineage_event_audit").await, 0);
    assert_eq!(catalog.count("lineage_edges").await, 0);
    // At the bound it is accepted.
    let (status, body) = send(
        catalog.base(),
        Method::POST,
        "/lineage",
        Some(run_event(&refs(&inputs[..100]), &refs(&outputs[..10]))),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // Into versions not in the catalog: pending until they are published.
    assert_eq!(catalog.count("lineage_pending_edges").await, 1_000);
}

fn parents(bundle: &serde_json::Value) -> Vec<String> {
    ancestors(bundle, "/depth")
        .into_iter()
        .map(|(v, _)| v)
        .collect()
}

#[tokio::test]
async fn a_strangers_lineage_into_an_unpublished_version_never_becomes_its_ancestry() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("downstream", "acme", "D").await;
    catalog.asset("raw", "acme", "R").await;
    let mallory = register(base, "mallory").await;

    // Before acme publishes report@1, Mallory names it as the output of her junk...
    let (status, answer) = send_as(
        base,
        Some(&mallory),
        Method::POST,
        "/lineage",
        Some(run_event(&["junk"], &["report@1"])),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["edgesAdded"], json!([]));
    assert_eq!(
        answer["edgesPending"],
        json!([{"parent": "junk", "child": "report@1"}])
    );
    // ...while acme's own pipeline reports raw → report@1 → downstream.
    let answer = catalog.lineage(&["raw"], &["report@1"]).await;
    assert_eq!(answer["edgesAdded"], json!([]));
    assert_eq!(answer["edgesPending"].as_array().unwrap().len(), 1);
    catalog.lineage(&["report@1"], &["downstream"]).await;

    // Pending edges are not lineage yet: downstream's readiness does not reach through them.
    let (_, ready) = get(base, "/ready?versionId=downstream").await;
    assert_eq!(ready["checked"], 2, "downstream and report@1: {ready}");

    catalog.asset("report@1", "acme", "Report").await;
    let (status, bundle) = get(base, "/bundle?versionId=report@1&depth=3").await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(
        parents(&bundle),
        ["raw"],
        "the publisher's own lineage only"
    );
    let (_, bundle) = get(base, "/bundle?versionId=downstream&depth=3").await;
    assert_eq!(parents(&bundle), ["report@1", "raw"]);
    for v in ["downstream", "report@1", "raw"] {
        catalog.entitle(v).await;
    }
    let (_, ready) = get(base, "/ready?versionId=downstream").await;
    assert_eq!(ready["ready"], true, "junk cannot hold it back: {ready}");
    assert_eq!(catalog.count("lineage_pending_edges").await, 0);
    assert_eq!(catalog.count("lineage_edges").await, 2);

    // Published now: Mallory's lineage into it is refused like any write to acme's asset.
    let (status, _) = send_as(
        base,
        Some(&mallory),
        Method::POST,
        "/lineage",
        Some(run_event(&["junk"], &["report@1"])),
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn the_owner_of_an_asset_can_remove_an_edge_into_it_and_nobody_else_can() {
    let catalog = Catalog::start(1).await;
    let base = catalog.base();
    catalog.producer("acme").await;
    for v in ["a", "b", "c"] {
        catalog.asset(v, "acme", v).await;
        catalog.entitle(v).await;
    }
    // a → b → c, and an input the catalog does not have (so c is not ready).
    catalog.lineage(&["a", "ghost"], &["b"]).await;
    catalog.lineage(&["b"], &["c"]).await;
    let (_, bundle) = get(base, "/bundle?versionId=c&depth=2").await;
    assert_eq!(parents(&bundle), ["b", "a", "ghost"]);
    let (_, ready) = get(base, "/ready?versionId=c").await;
    assert_eq!(ready["ready"], false, "{ready}");

    let mallory = register(base, "mallory").await;
    let remove = "/lineage?child=b&parent=ghost";
    for (token, expected) in [(None, 401), (Some(mallory.as_str()), 403)] {
        let (status, body) = send_as(base, token, Method::DELETE, remove, None).await;
        assert_eq!(status, expected, "{body}");
    }
    assert_eq!(catalog.count("lineage_edges").await, 3);

    let (status, body) = send(base, Method::DELETE, remove, None).await;
    assert_eq!(status, 204, "{body}");
    // The cached bundle and readiness of b's descendants changed with it.
    let (_, bundle) = get(base, "/bundle?versionId=c&depth=2").await;
    assert_eq!(parents(&bundle), ["b", "a"]);
    let (_, ready) = get(base, "/ready?versionId=c").await;
    assert_eq!(ready["ready"], true, "{ready}");

    let (status, _) = send(base, Method::DELETE, remove, None).await;
    assert_eq!(status, 404, "no such edge any more");
    let (status, _) = send(base, Method::DELETE, "/lineage?child=nope&parent=a", None).await;
    assert_eq!(status, 404, "no such asset");
    let (status, body) = send(base, Method::DELETE, "/lineage?parent=a", None).await;
    assert_bad_field(status, &body, "child");
    let (status, body) = send(base, Method::DELETE, "/lineage?child=b&parent=a%00", None).await;
    assert_bad_field(status, &body, "parent");
    assert_eq!(catalog.count("lineage_edges").await, 2);
}

#[tokio::test]
async fn an_event_of_many_outputs_holds_a_bounded_number_of_advisory_locks() {
    let catalog = Catalog::start(1).await;
    // Hold the event after its locks are taken: it inserts pending edges next, and this
    // session locks that table.
    let mut pg = catalog.pg.client(&catalog.database).await;
    let lock = pg.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE lineage_pending_edges IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let outputs: Vec<String> = (0..1_000).map(|i| format!("out{i}")).collect();
    let base = catalog.base().to_string();
    let event = run_event(&["in"], &refs(&outputs));
    let sent =
        tokio::spawn(async move { send(&base, Method::POST, "/lineage", Some(event)).await });
    let observer = catalog.pg.client(&catalog.database).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = \
                 'lineage_pending_edges'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break observer
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
        assert!(
            Instant::now() < deadline,
            "the event never reached its insert"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    lock.rollback().await.unwrap();
    let (status, body) = sent.await.unwrap();
    assert_eq!(status, 201, "{body}");
    // One lock per output would be 1,000 slots of PostgreSQL's shared lock table, which a few
    // such events at once fill for the whole cluster.
    assert!(held <= 64, "{held} advisory locks held by one event");
}
