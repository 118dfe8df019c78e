//! Memory snapshots: appended, latest first, bounded in size, the newest kept per agent.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Cluster, assert_bad_field};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_read_latest_first_and_the_oldest_past_retention_go() {
    let cluster = Cluster::start_with(
        1,
        &[
            ("AGENTS_MEMORY_RETENTION", "3"),
            ("AGENTS_MEMORY_MAX_BYTES", "100"),
            ("AGENTS_WORKERS", "0"),
        ],
    )
    .await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let agent = alice
        .agent(base, json!({"name": "Rememberer", "type": "chat"}))
        .await;
    let other = alice
        .agent(base, json!({"name": "Other", "type": "chat"}))
        .await;
    let path = format!("/agents/{}/memory", agent["id"]);
    for n in 0..5 {
        let (status, snapshot) = alice
            .send(base, Method::POST, &path, Some(json!({"data": {"n": n}})))
            .await;
        assert_eq!(status, 201, "{snapshot}");
        assert_eq!(snapshot["data"], json!({"n": n}));
        assert_eq!(snapshot["size_bytes"], 7);
    }
    let other_path = format!("/agents/{}/memory", other["id"]);
    let (status, _) = alice
        .send(
            base,
            Method::POST,
            &other_path,
            Some(json!({"data": "kept"})),
        )
        .await;
    assert_eq!(status, 201);

    let (status, page) = alice.get(base, &path).await;
    assert_eq!(status, 200, "{page}");
    let ns: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"]["n"])
        .collect();
    assert_eq!(ns, [&json!(4), &json!(3), &json!(2)]);
    let (_, first) = alice.get(base, &format!("{path}?limit=2")).await;
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let (_, second) = alice
        .get(base, &format!("{path}?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(second["items"][0]["data"], json!({"n": 2}));
    assert_eq!(second["next_cursor"], Value::Null);
    // Retention is per agent: the other agent's snapshot stays.
    assert_eq!(
        cluster.count("SELECT count(*) FROM agent_memories").await,
        4
    );

    // Too big, or malformed: 400 naming the field, nothing written.
    let big = "x".repeat(200);
    for (body, field) in [
        (json!({"data": big}), "data"),
        (json!({}), "data"),
        (json!({"data": "a\u{0}b"}), "data"),
        (json!({"data": 1, "more": 2}), "more"),
    ] {
        let (status, answer) = alice.send(base, Method::POST, &path, Some(body)).await;
        assert_bad_field(status, &answer, field);
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM agent_memories").await,
        4
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM audit_log WHERE action = 'agent.memory.append'")
            .await,
        6
    );

    // Append-only: nothing changes or removes a snapshot over the API.
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let (status, _) = alice
            .send(base, method.clone(), &path, Some(json!({"data": 1})))
            .await;
        assert_eq!(status, 405, "{method}");
    }
    // Another account's agent: 404 both ways.
    let mallory = cluster.user("mallory").await;
    assert_eq!(mallory.get(base, &path).await.0, 404);
    let (status, _) = mallory
        .send(base, Method::POST, &path, Some(json!({"data": "mine"})))
        .await;
    assert_eq!(status, 404);
    // A deleted agent's memory is gone with it from the API.
    let agent_path = format!("/agents/{}", agent["id"]);
    assert_eq!(
        alice.send(base, Method::DELETE, &agent_path, None).await.0,
        204
    );
    assert_eq!(alice.get(base, &path).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_large_snapshots_is_bounded_in_bytes_and_the_cursor_walks_them_all() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let agent = alice
        .agent(base, json!({"name": "Hoarder", "type": "chat"}))
        .await;
    // Five snapshots of 1.5 MB each (written straight to the table: a request body that large
    // is not the point here), then a small one, the newest.
    cluster
        .sql()
        .await
        .execute(
            "INSERT INTO agent_memories (agent_id, data, size_bytes) \
             SELECT $1, to_jsonb(n || repeat('x', 1500000)), 1500003 FROM generate_series(1, 5) n",
            &[&agent["id"].as_i64().unwrap()],
        )
        .await
        .unwrap();
    let path = format!("/agents/{}/memory", agent["id"]);
    let (status, _) = alice
        .send(base, Method::POST, &path, Some(json!({"data": "small"})))
        .await;
    assert_eq!(status, 201);

    let mut pages = Vec::new();
    let mut next = format!("{path}?limit=100");
    loop {
        let (status, page) = alice.get(base, &next).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        let bytes: i64 = items
            .iter()
            .map(|m| m["size_bytes"].as_i64().unwrap())
            .sum();
        assert!(!items.is_empty());
        assert!(
            bytes <= cascade_agents::memory::PAGE_MAX_BYTES,
            "a page of {bytes} bytes"
        );
        pages.push(items.len());
        match page["next_cursor"].as_str() {
            Some(cursor) => next = format!("{path}?limit=100&cursor={cursor}"),
            None => break,
        }
        assert!(pages.len() <= 6, "the cursor does not end: {pages:?}");
    }
    // 4 MiB holds the small one and two large ones, then two, then the last.
    assert_eq!(pages, [3, 2, 1]);
}
