//! A write's after-commit work (its cache invalidations and their broadcast) runs to the end
//! even when the client that sent it goes away.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Catalog, ancestors, get, register, send_as};

/// Polls `check` every 20 ms until it holds, at most `bound`.
async fn within<F, Fut>(bound: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_write_whose_client_disconnects_after_the_commit_still_invalidates_every_instance() {
    held_write_then(false).await;
}

#[tokio::test]
async fn a_stopping_server_finishes_a_write_whose_client_left_before_it_stops() {
    held_write_then(true).await;
}

/// A DELETE on instance A whose after-commit work is held (a table lock), whose client then
/// hangs up; with `stop_a`, A is also told to stop while the work is still held. Either way,
/// once the lock goes, the work finishes and B serves the bundle without the deleted asset.
async fn held_write_then(stop_a: bool) {
    let mut catalog = Catalog::start(2).await;
    let (a, b) = (
        catalog.servers[0].base.clone(),
        catalog.servers[1].base.clone(),
    );
    let token = register(&a, "writer").await;
    for (path, body) in [
        ("/producers", json!({"producerId": "w", "name": "W"})),
        (
            "/assets",
            json!({"versionId": "parent", "producerId": "w", "name": "before"}),
        ),
        (
            "/assets",
            json!({"versionId": "child", "producerId": "w", "name": "child"}),
        ),
        (
            "/lineage",
            crate::support::run_event(&["parent"], &["child"]),
        ),
    ] {
        let (status, answer) = send_as(&a, Some(&token), Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
    }
    let bundle_path = "/bundle?versionId=child&depth=1";
    let parent_name = |bundle: &Value| ancestors(bundle, "/asset/name")[0].1.clone();
    // Warm on B: the bundle is in B's in-process tier and in Redis.
    for _ in 0..2 {
        let (status, bundle) = get(&b, bundle_path).await;
        assert_eq!((status, parent_name(&bundle)), (200, json!("before")));
    }

    // Hold the write's after-commit work at a known point: the descendant lookup that picks
    // the bundles to invalidate reads lineage_edges, which this transaction locks. The DELETE
    // itself does not touch lineage_edges (lineage naming a deleted version stays), so it
    // commits. (A PATCH looks up nothing after its commit: `invalidation.rs`, "Content".)
    let mut pg = catalog.pg.client(&catalog.database).await;
    let lock = pg.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE lineage_edges IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let request = format!(
        "DELETE /listings/parent HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n",
        host = a.trim_start_matches("http://"),
    );
    let mut client = TcpStream::connect(a.trim_start_matches("http://"))
        .await
        .unwrap();
    client.write_all(request.as_bytes()).await.unwrap();

    // Committed, and its invalidation is waiting for the lock...
    let observer = catalog.pg.client(&catalog.database).await;
    let observer = &observer;
    let committed = within(Duration::from_secs(10), || async move {
        let left: i64 = observer
            .query_one(
                "SELECT count(*) FROM assets WHERE version_id = 'parent'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
    assert!(committed, "the DELETE committed");
    let waiting = within(Duration::from_secs(10), || async move {
        let n: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'lineage_edges'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    })
    .await;
    assert!(waiting, "the invalidation is waiting on the lock");

    // ...when the client goes away. The server reads the end of the stream, closes the
    // connection and drops the request with it: our side then reads its end in turn.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the server closed the connection");
    assert!(
        rest.is_empty(),
        "no answer while the write was held: {rest:?}"
    );
    // A stops now, with the write still held: its shutdown must wait for the write's
    // invalidations, not cut them off (the lock is released while A is stopping).
    let stopping = stop_a.then(|| {
        let a_server = catalog.servers.remove(0);
        tokio::task::spawn_blocking(move || drop(a_server))
    });
    if stopping.is_some() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    lock.rollback().await.unwrap();
    if let Some(stopping) = stopping {
        tokio::time::timeout(Duration::from_secs(30), stopping)
            .await
            .expect("A stopped within its bounds")
            .unwrap();
    }

    // B serves the parent as missing within a bound far below the bundle's 60 s TTL.
    let b = &b;
    let fresh = within(Duration::from_secs(5), || async move {
        let (_, bundle) = get(b, bundle_path).await;
        parent_name(&bundle) == Value::Null
    })
    .await;
    assert!(fresh, "B still serves the bundle from before the write");
}
