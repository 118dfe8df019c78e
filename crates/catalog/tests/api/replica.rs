//! The catalog on a primary and a streaming replica (`DATABASE_REPLICA_URLS`): cache loads
//! and search read from the replica when it is caught up, and a client's write is in its very
//! next read while the replica is paused (SIGSTOP), without that read hanging.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{self, Catalog, get, send};
use cascade_testkit::PgServer;

/// The replica and the catalog whose servers read from it (the catalog stops first).
async fn catalog_with_replica() -> (PgServer, Catalog) {
    let pg = PgServer::start_primary().await;
    let url = pg.fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_string();
    let replica = pg.start_replica().await;
    let extra = [
        ("DATABASE_REPLICA_URLS", replica.url(&database)),
        ("DATABASE_REPLICA_MAX_LAG", "1s".to_string()),
        ("DATABASE_REPLICA_TIMEOUT", "500ms".to_string()),
    ];
    let catalog = Catalog::start_on(pg, url, 1, &extra).await;
    (replica, catalog)
}

async fn replica_health(catalog: &Catalog) -> Value {
    let (status, health) = support::send_as(
        catalog.base(),
        Some(support::ADMIN_TOKEN),
        Method::GET,
        "/health/db",
        None,
    )
    .await;
    assert_eq!(status, 200, "{health}");
    health["replicas"]["replicas"][0].clone()
}

/// Polls `/health/db` (bounded: 20 s) until the replica's entry satisfies `done`.
async fn wait_for(catalog: &Catalog, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replica = replica_health(catalog).await;
        if done(&replica) {
            return replica;
        }
        assert!(
            Instant::now() < deadline,
            "waited 20s for {what}: {replica}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /search?q=` as the publisher (search answers signed-in callers).
async fn search(base: &str, text: &str) -> (u16, Value) {
    let token = support::publisher_token(base);
    let path = format!("/search?q={text}");
    support::send_as(base, token.as_deref(), Method::GET, &path, None).await
}

fn replica_reads(replica: &Value) -> u64 {
    replica["reads"].as_u64().expect("reads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_reads_come_from_the_replica_and_a_write_is_read_back_while_it_is_paused() {
    let (replica, catalog) = catalog_with_replica().await;
    let base = catalog.base();
    catalog.producer("acme").await;
    catalog.asset("v1", "acme", "Alpha").await;
    let before = wait_for(&catalog, "the replica to join rotation", |r| {
        r["in_rotation"] == true
    })
    .await;

    // Cold loads of an asset, a listing page and a search: read from the replica.
    let (status, asset) = get(base, "/listings/v1").await;
    assert_eq!(
        (status, asset["name"].as_str()),
        (200, Some("Alpha")),
        "{asset}"
    );
    let (status, page) = get(base, "/listings?q=alpha").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["versionId"], "v1", "{page}");
    let (status, found) = search(base, "alpha").await;
    assert_eq!(status, 200, "{found}");
    let served = replica_reads(&replica_health(&catalog).await) - replica_reads(&before);
    assert!(
        served >= 1,
        "no load reached the replica: {}",
        replica_health(&catalog).await
    );

    // Paused: the write is read back at once, from the primary, and no read hangs.
    replica.pause();
    let (status, body) = send(
        base,
        Method::PATCH,
        "/listings/v1",
        Some(json!({"name": "Alpha Prime"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let (status, asset) = get(base, "/listings/v1").await;
    assert_eq!(
        (status, asset["name"].as_str()),
        (200, Some("Alpha Prime")),
        "{asset}"
    );
    let (status, page) = get(base, "/listings?q=prime").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["versionId"], "v1", "{page}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "reads behind a paused replica took {:?}",
        started.elapsed()
    );
    let out = wait_for(&catalog, "the paused replica to leave rotation", |r| {
        r["in_rotation"] == false
    })
    .await;
    assert_eq!(out["up"], false, "{out}");

    replica.resume();
    wait_for(&catalog, "the resumed replica to rejoin", |r| {
        r["in_rotation"] == true
    })
    .await;
    let (status, found) = search(base, "prime").await;
    assert!(found["items"].to_string().contains("v1"), "{found}");
    assert_eq!(status, 200, "{found}");
    let metrics = support::http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cascade_pg_replica_in_rotation{replica=\"127.0.0.1:"),
        "{metrics}"
    );
}
