//! The interaction log end to end: links and unlinks are written to `interactions` off the
//! request path, a full buffer drops and counts instead of making a request wait, what waited
//! while PostgreSQL was down is written when it returns, what is buffered at shutdown is
//! written, and retention deletes old rows. A binary of its own: the drop counter lives in the
//! process-wide metrics recorder.

#[path = "citizens/support.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{World, http};

/// The interactions of `username`'s account as `type:venice_username`, oldest first.
async fn logged(world: &World, username: &str) -> Vec<String> {
    world
        .pg
        .client(&world.database)
        .await
        .query(
            "SELECT i.interaction_type || ':' || (i.data ->> 'venice_username') \
             FROM interactions i JOIN cascade_users u ON u.id = i.user_id \
             WHERE u.username = $1 ORDER BY i.created_at, i.id",
            &[&username],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Polls [`logged`] until it holds `n` rows (at most `bound`).
async fn logged_within(world: &World, username: &str, n: usize, bound: Duration) -> Vec<String> {
    let deadline = Instant::now() + bound;
    loop {
        let rows = logged(world, username).await;
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The value of one series of `/metrics` (0 when absent).
async fn metric(world: &World, series: &str) -> f64 {
    world
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

const DROPPED_FULL: &str = "cascade_interactions_dropped_total{reason=\"buffer_full\"}";

async fn my_interactions(world: &World, token: &str, query: &str) -> reqwest::Response {
    http()
        .get(world.url(&format!("/me/interactions{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_unlinks_are_logged_and_shown_to_their_account_only() {
    let world = World::start(&[("INTERACTIONS_FLUSH_INTERVAL", "100ms".to_string())]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    assert_eq!(world.link_citizen(&alice, "Italia").await.status(), 200);
    assert_eq!(
        logged_within(&world, "alice", 1, Duration::from_secs(10)).await,
        vec!["citizen_link:Italia"]
    );
    assert_eq!(world.unlink(Some(&alice)).await.status(), 204);
    // An unlink that removed nothing is not an interaction.
    assert_eq!(world.unlink(Some(&alice)).await.status(), 204);
    // A refused link is not one either.
    assert_eq!(
        world.link_citizen(&alice, "Nobody_Here").await.status(),
        404
    );
    assert_eq!(world.link_citizen(&alice, "sea_trader").await.status(), 200);
    // Reading a citizen is anonymous: nobody's interaction.
    assert_eq!(world.citizen("Italia").await.status(), 200);
    let rows = logged_within(&world, "alice", 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(logged(&world, "alice").await, rows, "nothing more came");
    assert_eq!(
        rows,
        vec![
            "citizen_link:Italia",
            "citizen_unlink:Italia",
            "citizen_link:sea_trader"
        ]
    );

    // GET /me/interactions: newest first, one page at a time, the caller's own only.
    let page: Value = my_interactions(&world, &alice, "?limit=2")
        .await
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["citizen_link", "citizen_unlink"], "{page}");
    assert_eq!(page["items"][0]["data"]["venice_username"], "sea_trader");
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let rest: Value = my_interactions(&world, &alice, &format!("?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1, "{rest}");
    assert_eq!(rest["items"][0]["data"]["venice_username"], "Italia");
    assert_eq!(rest["next_cursor"], Value::Null);
    let theirs: Value = my_interactions(&world, &bob, "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["items"], serde_json::json!([]));

    for bad in [
        "?limit=0",
        "?limit=101",
        "?limit=x",
        "?cursor=abc",
        "?cursor=1.2",
    ] {
        let response = my_interactions(&world, &alice, bad).await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{bad}");
    }
    let anonymous = http()
        .get(world.url("/me/interactions"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_and_counts_instead_of_blocking_requests() {
    let world = World::start(&[
        ("INTERACTIONS_BUFFER", "3".to_string()),
        ("INTERACTIONS_BATCH", "2".to_string()),
        ("INTERACTIONS_FLUSH_INTERVAL", "50ms".to_string()),
    ])
    .await;
    let token = world.register("alice").await;
    // The writer is stuck while requests still work (a link needs PostgreSQL, so stopping it
    // would fail the links themselves): its INSERT waits behind a lock another session holds.
    // SHARE mode stops writes to the table and nothing else (reads, table statistics).
    let locker = world.pg.client(&world.database).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE interactions IN SHARE MODE")
        .await
        .unwrap();
    let dropped_before = metric(&world, DROPPED_FULL).await;
    let links = 12;
    for n in 0..links {
        let citizen = if n % 2 == 0 { "Italia" } else { "sea_trader" };
        let started = Instant::now();
        assert_eq!(world.link_citizen(&token, citizen).await.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a link waited for the log: {:?}",
            started.elapsed()
        );
    }
    // At most one batch (2) in the writer's hands and a full buffer (3) kept; the rest dropped.
    let dropped = metric(&world, DROPPED_FULL).await - dropped_before;
    assert!(dropped >= (links - 2 - 3) as f64, "dropped {dropped}");
    assert!(dropped <= (links - 3) as f64, "dropped {dropped}");
    assert!(
        logged(&world, "alice").await.is_empty(),
        "the table is locked"
    );

    // The lock goes: what was kept is written, nothing more.
    locker.batch_execute("ROLLBACK").await.unwrap();
    let kept = links - dropped as usize;
    let rows = logged_within(&world, "alice", kept, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rows.len(), kept, "{rows:?}");
    assert_eq!(logged(&world, "alice").await.len(), kept);
    assert!(
        metric(&world, "cascade_interactions_written_total").await >= kept as f64,
        "written is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactions_waiting_while_postgresql_is_down_are_written_when_it_returns() {
    let mut world = World::start(&[("INTERACTIONS_FLUSH_INTERVAL", "2s".to_string())]).await;
    let token = world.register("alice").await;
    // The first row shows when the writer's tick came; the second waits for the next tick,
    // ~2 s later, and PostgreSQL is gone long before then.
    assert_eq!(world.link_citizen(&token, "Italia").await.status(), 200);
    assert_eq!(
        logged_within(&world, "alice", 1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    assert_eq!(world.link_citizen(&token, "sea_trader").await.status(), 200);
    assert_eq!(logged(&world, "alice").await.len(), 1, "not written yet");
    world.pg.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    world.pg.restart().await;
    let rows = logged_within(&world, "alice", 2, Duration::from_secs(30)).await;
    assert_eq!(
        rows,
        vec!["citizen_link:Italia", "citizen_link:sea_trader"],
        "written once, after PostgreSQL came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_buffered_at_shutdown_is_written() {
    let world = World::start(&[("INTERACTIONS_FLUSH_INTERVAL", "1h".to_string())]).await;
    let token = world.register("alice").await;
    assert_eq!(world.link_citizen(&token, "Italia").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(logged(&world, "alice").await.is_empty(), "not written yet");
    let World {
        server,
        database,
        pg,
        venice,
        redis,
    } = world;
    drop(server);
    let rows: i64 = pg
        .client(&database)
        .await
        .query_one("SELECT count(*) FROM interactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the shutdown flushed the buffer");
    drop((venice, redis));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_rows_in_bounded_batches_and_keeps_recent_ones() {
    let world = World::start(&[
        ("INTERACTIONS_RETENTION", "720h".to_string()),
        ("INTERACTIONS_SWEEP_INTERVAL", "200ms".to_string()),
    ])
    .await;
    world.register("alice").await;
    let db = world.pg.client(&world.database).await;
    // 12,000 rows past 30 days (more than one delete statement takes), one within.
    db.batch_execute(
        "INSERT INTO interactions (id, user_id, interaction_type, data, created_at) \
         SELECT gen_random_uuid(), u.id, 'pattern_view', '{}', now() - interval '31 days' \
         FROM cascade_users u, generate_series(1, 12000) WHERE u.username = 'alice'; \
         INSERT INTO interactions (id, user_id, interaction_type, data, created_at) \
         SELECT gen_random_uuid(), u.id, 'citizen_link', '{\"venice_username\": \"Italia\"}', \
                now() - interval '29 days' \
         FROM cascade_users u WHERE u.username = 'alice'",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let count = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    while count("SELECT count(*) FROM interactions WHERE created_at < now() - interval '30 days'")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "old rows still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(logged(&world, "alice").await, vec!["citizen_link:Italia"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_pattern_view_is_logged_and_an_anonymous_one_is_not() {
    let world = World::start(&[("INTERACTIONS_FLUSH_INTERVAL", "100ms".to_string())]).await;
    let alice = world.register("alice").await;
    let anonymous = http()
        .get(world.url("/patterns/economic_consciousness"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 200);
    let viewed = http()
        .get(world.url("/patterns/economic_consciousness"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(viewed.status(), 200);
    let pattern: Value = viewed.json().await.unwrap();
    // A bad token on the public route is a 401, not an anonymous read.
    let forged = http()
        .get(world.url("/patterns/economic_consciousness"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page: Value = my_interactions(&world, &alice, "")
            .await
            .json()
            .await
            .unwrap();
        if !page["items"].as_array().unwrap().is_empty() || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "one view, the signed-in one: {page}");
    assert_eq!(items[0]["type"], "pattern_view");
    assert_eq!(items[0]["data"]["type"], "economic_consciousness");
    assert_eq!(
        items[0]["data"]["emergence_score"], pattern["data"]["emergence_score"],
        "{page} {pattern}"
    );
    let total: i64 = world
        .pg
        .client(&world.database)
        .await
        .query_one("SELECT count(*) FROM interactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 1, "the anonymous read logged nothing");
}
