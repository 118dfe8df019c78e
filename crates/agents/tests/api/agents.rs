//! Agents over HTTP: create (one and bulk), read, list, change, delete; caching that never
//! serves a stale agent on any instance; bad input; accounts that cannot see each other.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Cluster, UNIFIED, assert_bad_field};

fn ids(page: &Value) -> Vec<i64> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_life_is_seen_at_once_on_every_instance() {
    an_agents_life_across_instances(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_life_is_seen_at_once_on_every_instance_in_unified_mode() {
    an_agents_life_across_instances(&[UNIFIED]).await;
}

/// Two instances with `settings`: every change on one is what the next read on the other sees.
async fn an_agents_life_across_instances(settings: &[(&str, &str)]) {
    let cluster = Cluster::start_with(2, settings).await;
    let (a, b) = (cluster.base(0), cluster.base(1));
    let alice = cluster.user("alice").await;

    let agent = alice
        .agent(
            a,
            json!({"name": "Scout", "type": "chat", "config": {"model": "m1"},
                   "capabilities": ["chat", "code", "chat"]}),
        )
        .await;
    let id = agent["id"].as_i64().unwrap();
    assert_eq!(agent["status"], "active");
    assert_eq!(agent["version"], 1);
    assert_eq!(agent["capabilities"], json!(["chat", "code"]));

    // Read (and cache) on both instances, then change it on one: the other sees the change.
    let path = format!("/agents/{id}");
    for base in [a, b] {
        let (status, read) = alice.get(base, &path).await;
        assert_eq!((status, &read), (200, &agent));
    }
    let (status, list) = alice.get(b, "/agents?status=active").await;
    assert_eq!((status, ids(&list)), (200, vec![id]));

    let (status, changed) = alice
        .send(
            a,
            Method::PATCH,
            &path,
            Some(json!({"status": "paused", "config": {"model": "m2"}})),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["version"], 2);
    assert_eq!(changed["name"], "Scout");
    let (_, read) = alice.get(b, &path).await;
    assert_eq!(read["status"], "paused");
    assert_eq!(read["config"], json!({"model": "m2"}));
    let (_, list) = alice.get(b, "/agents?status=active").await;
    assert_eq!(
        ids(&list),
        Vec::<i64>::new(),
        "a cached list page went stale: {list}"
    );
    let (_, list) = alice.get(b, "/agents?status=paused").await;
    assert_eq!(ids(&list), vec![id]);

    let (status, body) = alice.send(b, Method::DELETE, &path, None).await;
    assert_eq!(status, 204, "{body}");
    for base in [a, b] {
        let (status, body) = alice.get(base, &path).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "not_found");
        let (_, list) = alice.get(base, "/agents").await;
        assert_eq!(ids(&list), Vec::<i64>::new());
    }
    let (status, _) = alice.send(a, Method::DELETE, &path, None).await;
    assert_eq!(status, 404, "deleted once only");
    // Soft: the row stays for the audit trail's sake.
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM agents WHERE deleted_at IS NOT NULL")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_an_id_before_its_create_does_not_hide_the_agent() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    // Ids are sequential: ask for the next one first, so "no such agent" is cached.
    let (status, _) = alice.get(base, "/agents/1").await;
    assert_eq!(status, 404);
    let agent = alice
        .agent(base, json!({"name": "First", "type": "t"}))
        .await;
    assert_eq!(agent["id"], 1);
    let (status, read) = alice.get(base, "/agents/1").await;
    assert_eq!((status, read), (200, agent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_and_page_with_a_cursor() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let mut created = Vec::new();
    for (i, (kind, status, caps)) in [
        ("chat", "active", vec!["chat"]),
        ("code", "active", vec!["code", "chat"]),
        ("chat", "inactive", vec![]),
        ("chat", "active", vec!["search"]),
        ("code", "paused", vec!["code"]),
    ]
    .into_iter()
    .enumerate()
    {
        let agent = alice
            .agent(
                base,
                json!({"name": format!("agent {i}"), "type": kind, "status": status, "capabilities": caps}),
            )
            .await;
        created.push(agent["id"].as_i64().unwrap());
    }
    let newest_first: Vec<i64> = created.iter().rev().copied().collect();

    // Pages of two, newest first, until the cursor runs out.
    let mut seen = Vec::new();
    let mut path = "/agents?limit=2".to_string();
    loop {
        let (status, page) = alice.get(base, &path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/agents?limit=2&cursor={cursor}"),
            None => break,
        }
        assert!(seen.len() <= 5, "the cursor does not end");
    }
    assert_eq!(seen, newest_first);

    let filtered = |query: &'static str| {
        let alice = &alice;
        async move { ids(&alice.get(base, &format!("/agents?{query}")).await.1) }
    };
    assert_eq!(
        filtered("type=chat").await,
        vec![created[3], created[2], created[0]]
    );
    assert_eq!(
        filtered("capability=chat").await,
        vec![created[1], created[0]]
    );
    assert_eq!(filtered("type=code&status=paused").await, vec![created[4]]);
    assert_eq!(filtered("capability=none").await, Vec::<i64>::new());

    for (query, field) in [
        ("status=gone", "status"),
        ("type=Chat", "type"),
        ("capability=", "capability"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=007", "cursor"),
    ] {
        let (status, body) = alice.get(base, &format!("/agents?{query}")).await;
        assert_bad_field(status, &body, field);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_creates_all_or_nothing() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let ok = |name: &str| json!({"name": name, "type": "worker"});

    let (status, body) = alice
        .send(
            base,
            Method::POST,
            "/agents/bulk",
            Some(json!({"agents": [ok("a"), ok("b"), ok("c")]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let names: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);

    let agents_before = cluster.count("SELECT count(*) FROM agents").await;
    let audit_before = cluster.count("SELECT count(*) FROM audit_log").await;
    for (body, field) in [
        (
            json!({"agents": [ok("d"), ok("e"), {"name": "f", "type": "Bad Type"}]}),
            "agents[2].type",
        ),
        (json!({"agents": []}), "agents"),
        // AGENTS_BULK_MAX is 5 on these servers.
        (
            json!({"agents": [ok("1"), ok("2"), ok("3"), ok("4"), ok("5"), ok("6")]}),
            "agents",
        ),
        (json!({"agent": [ok("d")]}), "agent"),
        (json!([ok("d")]), "body"),
    ] {
        let (status, answer) = alice
            .send(base, Method::POST, "/agents/bulk", Some(body))
            .await;
        assert_bad_field(status, &answer, field);
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM agents").await,
        agents_before
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM audit_log").await,
        audit_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_field_and_writes_nothing() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let agent = alice
        .agent(base, json!({"name": "Kept", "type": "chat"}))
        .await;
    let path = format!("/agents/{}", agent["id"]);

    for (body, field) in [
        (json!({"type": "chat"}), "name"),
        (json!({"name": "", "type": "chat"}), "name"),
        (
            json!({"name": "x", "type": "chat", "config": {"bad": "a\u{0}b"}}),
            "config",
        ),
        (
            json!({"name": "x", "type": "chat", "config": "text"}),
            "config",
        ),
        (
            json!({"name": "x", "type": "chat", "capabilities": "chat"}),
            "capabilities",
        ),
        (
            json!({"name": "x", "type": "chat", "status": "running"}),
            "status",
        ),
        (
            json!({"name": "x", "type": "chat", "owner_id": 2}),
            "owner_id",
        ),
    ] {
        let (status, answer) = alice.send(base, Method::POST, "/agents", Some(body)).await;
        assert_bad_field(status, &answer, field);
    }
    let (status, same) = alice
        .send(base, Method::PATCH, &path, Some(json!({})))
        .await;
    assert_eq!(
        (status, &same),
        (200, &agent),
        "an empty change changes nothing"
    );
    for (body, field) in [
        (json!({"name": 3}), "name"),
        (json!({"status": "gone"}), "status"),
        (json!({"capabilities": ["ok", "Not Ok"]}), "capabilities[1]"),
    ] {
        let (status, answer) = alice.send(base, Method::PATCH, &path, Some(body)).await;
        assert_bad_field(status, &answer, field);
    }
    for bad in [
        "/agents/0",
        "/agents/abc",
        "/agents/-1",
        "/agents/99999999999999999999",
    ] {
        let (status, answer) = alice.get(base, bad).await;
        assert_bad_field(status, &answer, "id");
    }
    // Not JSON at all: still the JSON error shape.
    let response = cascade_core::upstream::http_client(
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(10),
    )
    .unwrap()
    .post(format!("{base}/agents"))
    .bearer_auth(&alice.token)
    .header("content-type", "application/json")
    .body("{not json")
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    assert_eq!(cluster.count("SELECT count(*) FROM agents").await, 1);
    let (_, read) = alice.get(base, &path).await;
    assert_eq!(read, agent, "a refused change changed nothing");
    // One row: the create.
    assert_eq!(cluster.count("SELECT count(*) FROM audit_log").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_agents_are_invisible_and_untouchable() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let mallory = cluster.user("mallory").await;
    let agent = alice
        .agent(base, json!({"name": "Private", "type": "chat"}))
        .await;
    let path = format!("/agents/{}", agent["id"]);
    // Alice reads it first, so it is cached when Mallory asks.
    assert_eq!(alice.get(base, &path).await.0, 200);

    let (status, body) = mallory.get(base, &path).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = mallory
        .send(
            base,
            Method::PATCH,
            &path,
            Some(json!({"name": "Mine now"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = mallory.send(base, Method::DELETE, &path, None).await;
    assert_eq!(status, 404, "{body}");
    let (_, list) = mallory.get(base, "/agents").await;
    assert_eq!(ids(&list), Vec::<i64>::new());
    let (_, audit) = mallory.get(base, "/audit").await;
    assert_eq!(audit["items"], json!([]), "{audit}");

    let (status, read) = alice.get(base, &path).await;
    assert_eq!((status, read), (200, agent));
    // Without a token: 401.
    let (status, body) = crate::support::request(base, None, Method::GET, "/agents", None).await;
    assert_eq!(status, 401, "{body}");
}
