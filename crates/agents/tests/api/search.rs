//! `GET /search` on a fixed corpus: the caller's agents and workflows and the catalog's assets,
//! found by stems, prefixes and typos, ranked (a name match above a description-only one),
//! never another account's, fresh after a write, and 400s naming the field.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Cluster, User, assert_bad_field};

/// `(type, name)` of each hit, in the order given.
fn hits(answer: &Value) -> Vec<(String, String)> {
    answer["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items: {answer}"))
        .iter()
        .map(|hit| {
            (
                hit["type"].as_str().unwrap().to_string(),
                hit["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn names(answer: &Value) -> Vec<String> {
    hits(answer).into_iter().map(|(_, name)| name).collect()
}

async fn search(user: &User, base: &str, query: &str) -> Value {
    let (status, answer) = user.get(base, &format!("/search?{query}")).await;
    assert_eq!(status, 200, "{query}: {answer}");
    answer
}

async fn workflow(user: &User, base: &str, name: &str) {
    let body = json!({"name": name, "steps": [{"capability": "echo", "input": {}}]});
    let (status, created) = user
        .send(base, Method::POST, "/workflows", Some(body))
        .await;
    assert_eq!(status, 201, "{created}");
}

/// The producer `acme`, `user`'s.
async fn producer(user: &User, base: &str) {
    let body = json!({"producerId": "acme", "name": "Acme"});
    let (status, created) = user
        .send(base, Method::POST, "/producers", Some(body))
        .await;
    assert_eq!(status, 201, "{created}");
}

async fn asset(user: &User, base: &str, version: &str, name: &str, description: &str) {
    let body = json!({
        "versionId": version,
        "producerId": "acme",
        "name": name,
        "metadata": {"description": description},
    });
    let (status, created) = user.send(base, Method::POST, "/assets", Some(body)).await;
    assert_eq!(status, 201, "{created}");
}

/// Alice's agents and workflow, Bob's agent, and public assets.
async fn corpus(cluster: &Cluster) -> (User, User) {
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    for (name, kind, capabilities) in [
        ("Machine learning trainer", "ml", vec!["train"]),
        ("Prices watcher", "finance", vec!["watch"]),
        ("Run scheduler", "ops", vec!["schedule"]),
        ("Forecast", "chat", vec!["predict"]),
        ("Weather desk", "chat", vec!["forecast"]),
    ] {
        alice
            .agent(
                base,
                json!({"name": name, "type": kind, "capabilities": capabilities}),
            )
            .await;
    }
    workflow(&alice, base, "Machine learning pipeline").await;
    bob.agent(
        base,
        json!({"name": "Machine learning secret", "type": "ml"}),
    )
    .await;
    workflow(&bob, base, "Secret prices pipeline").await;
    producer(&alice, base).await;
    asset(&alice, base, "prices@1", "Prices 2024", "daily close").await;
    asset(&alice, base, "rain@1", "Rainfall", "a forecast of rain").await;
    asset(&alice, base, "fc@1", "Forecasts daily", "numbers").await;
    (alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_stems_typos_and_prefixes_across_types_ranked_and_only_the_callers_own() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let (alice, bob) = corpus(&cluster).await;

    // Stems, and several types in one answer: "price" finds the agent and the asset "Prices".
    let answer = search(&alice, base, "q=price").await;
    let found = hits(&answer);
    assert!(
        found.contains(&("agents".into(), "Prices watcher".into())),
        "{answer}"
    );
    assert!(
        found.contains(&("assets".into(), "Prices 2024".into())),
        "{answer}"
    );
    assert_eq!(answer["types"], json!(["assets", "agents", "workflows"]));
    // Bob's workflow "Secret prices pipeline" is his.
    assert!(
        !names(&answer).iter().any(|n| n.contains("Secret")),
        "{answer}"
    );
    assert_eq!(
        names(&search(&alice, base, "q=running").await),
        ["Run scheduler"]
    );

    // Typos and prefixes find the name; Bob's "Machine learning secret" is never Alice's.
    for query in ["q=machne%20lerning", "q=mach", "q=machine"] {
        let answer = search(&alice, base, query).await;
        let mut found = hits(&answer);
        found.sort();
        assert_eq!(
            found,
            [
                ("agents".to_string(), "Machine learning trainer".to_string()),
                (
                    "workflows".to_string(),
                    "Machine learning pipeline".to_string()
                ),
            ],
            "{query}: {answer}"
        );
    }
    assert_eq!(
        names(&search(&bob, base, "q=machine&types=agents").await),
        ["Machine learning secret"]
    );

    // A name match ranks above a match of the description (assets) or capabilities (agents)
    // only, in one type and across types.
    let answer = search(&alice, base, "q=forecast&types=assets").await;
    assert_eq!(names(&answer), ["Forecasts daily", "Rainfall"], "{answer}");
    let answer = search(&alice, base, "q=forecast&types=agents").await;
    assert_eq!(names(&answer), ["Forecast", "Weather desk"], "{answer}");
    let answer = search(&alice, base, "q=forecast").await;
    let order = names(&answer);
    let position = |name: &str| order.iter().position(|n| n == name).expect(name);
    for named in ["Forecast", "Forecasts daily"] {
        for described in ["Weather desk", "Rainfall"] {
            assert!(position(named) < position(described), "{answer}");
        }
    }
    let scores: Vec<f64> = answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hit| hit["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{answer}");
    // Each hit carries the entity as its own GET shows it.
    let agent = &answer["items"][position("Forecast")]["item"];
    let (status, shown) = alice.get(base, &format!("/agents/{}", agent["id"])).await;
    assert_eq!(status, 200);
    assert_eq!(&shown, agent);

    // `types` narrows, `limit` bounds the merged list.
    assert_eq!(
        hits(&search(&alice, base, "q=machine&types=workflows").await),
        [("workflows".into(), "Machine learning pipeline".into())]
    );
    assert_eq!(
        search(&alice, base, "q=forecast&limit=1").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_shows_in_the_next_search_and_bad_input_is_a_400() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    producer(&alice, base).await;

    // Each answer is cached; the writes remove them.
    for (query, expected) in [("q=zebra", 0), ("q=okapi", 0)] {
        let answer = search(&alice, base, query).await;
        assert_eq!(hits(&answer).len(), expected, "{answer}");
    }
    let agent = alice
        .agent(base, json!({"name": "Zebra tracker", "type": "chat"}))
        .await;
    assert_eq!(
        hits(&search(&alice, base, "q=zebra").await),
        [("agents".into(), "Zebra tracker".into())]
    );
    let path = format!("/agents/{}", agent["id"]);
    let (status, _) = alice
        .send(
            base,
            Method::PATCH,
            &path,
            Some(json!({"name": "Okapi tracker"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(hits(&search(&alice, base, "q=zebra").await), []);
    assert_eq!(
        names(&search(&alice, base, "q=okapi").await),
        ["Okapi tracker"]
    );
    workflow(&alice, base, "Okapi feeding").await;
    asset(&alice, base, "okapi@1", "Okapi sightings", "").await;
    let mut found = hits(&search(&alice, base, "q=okapi").await);
    found.sort();
    assert_eq!(
        found,
        [
            ("agents".to_string(), "Okapi tracker".to_string()),
            ("assets".to_string(), "Okapi sightings".to_string()),
            ("workflows".to_string(), "Okapi feeding".to_string()),
        ]
    );
    assert_eq!(alice.send(base, Method::DELETE, &path, None).await.0, 204);
    assert!(!names(&search(&alice, base, "q=okapi").await).contains(&"Okapi tracker".to_string()));

    let long = "x".repeat(201);
    for (query, field) in [
        ("".to_string(), "q"),
        ("q=".to_string(), "q"),
        (format!("q={long}"), "q"),
        ("q=a%07b".to_string(), "q"),
        ("q=okapi&types=robots".to_string(), "types"),
        ("q=okapi&types=agents,".to_string(), "types"),
        ("q=okapi&limit=0".to_string(), "limit"),
        ("q=okapi&limit=51".to_string(), "limit"),
        ("q=okapi&limit=many".to_string(), "limit"),
    ] {
        let (status, body) = alice.get(base, &format!("/search?{query}")).await;
        assert_bad_field(status, &body, field);
    }
    let (status, _) =
        crate::support::request(base, None, Method::GET, "/search?q=okapi", None).await;
    assert_eq!(status, 401);
}
