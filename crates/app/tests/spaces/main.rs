//! Collaboration spaces and consciousness sessions end to end: the real application
//! in-process (two instances where it matters), real PostgreSQL and Redis.

mod input;
mod sessions;
mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use support::{User, World, code, message};

/// `n` users, each with an active session at `level` (registered and started concurrently).
async fn users_in_session(world: &World, prefix: &str, n: usize, level: &str) -> Vec<User> {
    let users = futures_util::future::join_all((0..n).map(|i| async move {
        let user = world.register(&format!("{prefix}{i:02}")).await;
        world.session(&user, level, None).await;
        user
    }))
    .await;
    assert_eq!(users.len(), n);
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_joins_across_two_instances_admit_exactly_the_limit() {
    let world = World::start(2, &[]).await;
    let owner = world.paid("owner").await;
    world.space(&owner, "salon", 10, "0.50").await;
    // Each instance caches the empty space before the race: the joins must invalidate it.
    for n in 0..2 {
        assert_eq!(world.read(n, "/spaces/salon").await["participant_count"], 0);
    }
    let users = users_in_session(&world, "guest", 50, "0.90").await;

    let answers = futures_util::future::join_all(
        users
            .iter()
            .enumerate()
            .map(|(i, user)| world.call(i, Method::POST, "/spaces/salon/join", Some(user), None)),
    )
    .await;
    let admitted = answers.iter().filter(|(s, _)| *s == 201).count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 409)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(admitted, 10, "{answers:?}");
    assert_eq!(refused.len(), 40, "{answers:?}");
    for body in refused {
        assert_eq!(code(body), "conflict");
        assert!(message(body).contains("limit is 10 participants"), "{body}");
    }

    assert_eq!(
        world.count("SELECT count(*) FROM space_participants").await,
        10
    );
    assert_eq!(
        world
            .count("SELECT participant_count::int8 FROM collaboration_spaces")
            .await,
        10
    );
    for n in 0..2 {
        let space = world.read(n, "/spaces/salon").await;
        assert_eq!(space["participant_count"], 10, "instance {n}");
        let list = world.read(n, "/spaces/salon/participants").await;
        assert_eq!(list["count"], 10, "instance {n}");
        assert_eq!(list["participants"].as_array().unwrap().len(), 10);
    }

    // A place frees up: one of the refused gets in; joining twice changes nothing.
    let inside = users
        .iter()
        .zip(&answers)
        .find(|(_, (s, _))| *s == 201)
        .unwrap()
        .0;
    let outside = users
        .iter()
        .zip(&answers)
        .find(|(_, (s, _))| *s == 409)
        .unwrap()
        .0;
    let (status, _) = world
        .call(0, Method::POST, "/spaces/salon/join", Some(inside), None)
        .await;
    assert_eq!(status, 200, "a participant already");
    let (status, _) = world
        .call(1, Method::POST, "/spaces/salon/leave", Some(inside), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(world.read(0, "/spaces/salon").await["participant_count"], 9);
    let (status, body) = world
        .call(0, Method::POST, "/spaces/salon/join", Some(outside), None)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["participant_count"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_below_the_threshold_or_without_a_session_is_refused_saying_why() {
    let world = World::start(1, &[]).await;
    let owner = world.paid("owner").await;
    world.space(&owner, "deep", 10, "0.70").await;
    let ana = world.register("ana").await;

    let (status, body) = world
        .call(0, Method::POST, "/spaces/deep/join", Some(&ana), None)
        .await;
    assert_eq!(status, 403);
    assert_eq!(code(&body), "forbidden");
    assert!(
        message(&body).contains("needs an active consciousness session"),
        "{body}"
    );

    let session = world.session(&ana, "0.69", None).await;
    let (status, body) = world
        .call(0, Method::POST, "/spaces/deep/join", Some(&ana), None)
        .await;
    assert_eq!(status, 403);
    assert!(message(&body).contains("0.69"), "{body}");
    assert!(message(&body).contains("below"), "{body}");
    assert!(message(&body).contains("0.70"), "{body}");
    assert_eq!(
        world.count("SELECT count(*) FROM space_participants").await,
        0
    );

    // Exactly at the threshold is enough.
    let path = format!("/consciousness/sessions/{}", session["id"]);
    let (status, body) = world
        .call(
            0,
            Method::PATCH,
            &path,
            Some(&ana),
            Some(json!({"consciousness_level": "0.7"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["consciousness_level"], "0.70");
    let (status, body) = world
        .call(0, Method::POST, "/spaces/deep/join", Some(&ana), None)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["participant_count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_ends_once_and_its_user_leaves_their_spaces() {
    // 2 s: long enough for `alive`'s heartbeats to keep up on a loaded machine.
    let world = World::start(2, &[("CONSCIOUSNESS_SESSION_IDLE", "2s".to_string())]).await;
    let owner = world.paid("owner").await;
    world.space(&owner, "lagoon", 10, "0.50").await;
    let alive = world.register("alive").await;
    let idle = world.register("idle").await;
    let kept = world.session(&alive, "0.80", None).await;
    let lost = world.session(&idle, "0.80", Some("lagoon")).await;
    for user in [&alive, &idle] {
        let (status, body) = world
            .call(0, Method::POST, "/spaces/lagoon/join", Some(user), None)
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Both instances cache the two participants.
    for n in 0..2 {
        assert_eq!(
            world.read(n, "/spaces/lagoon/participants").await["count"],
            2
        );
    }
    let mut events = world.servers[1].events.subscribe();

    // `alive` sends heartbeats; `idle` does not. The sweep runs every 500 ms.
    let heartbeat = format!("/consciousness/sessions/{}/heartbeat", kept["id"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = world
            .call(1, Method::POST, &heartbeat, Some(&alive), None)
            .await;
        assert_eq!(status, 200, "{body}");
        let count = world.read(1, "/spaces/lagoon/participants").await["count"].clone();
        if count == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle session never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in 0..2 {
        let list = world.read(n, "/spaces/lagoon/participants").await;
        assert_eq!(list["participants"][0]["username"], "alive", "instance {n}");
        assert_eq!(
            world.read(n, "/spaces/lagoon").await["participant_count"],
            1
        );
    }
    let row = world
        .sql()
        .await
        .query_one(
            "SELECT is_active, end_reason FROM consciousness_sessions WHERE id = $1",
            &[&(lost["id"].as_i64().unwrap() as i32)],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("idle"));

    // An ended session takes no heartbeat; its user may start a new one.
    let path = format!("/consciousness/sessions/{}/heartbeat", lost["id"]);
    let (status, body) = world.call(0, Method::POST, &path, Some(&idle), None).await;
    assert_eq!(status, 409, "{body}");
    world.session(&idle, "0.80", Some("lagoon")).await;

    // The instances published it once between them: one `space.left`, one `session.ended`.
    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await
    {
        seen.push((
            event.channel.clone(),
            event.kind.clone(),
            event.data.clone(),
        ));
    }
    let left: Vec<_> = seen.iter().filter(|e| e.1 == "space.left").collect();
    assert_eq!(left.len(), 1, "{seen:?}");
    assert_eq!(left[0].0, "space:lagoon");
    assert_eq!(left[0].2["username"], "idle");
    assert_eq!(left[0].2["reason"], "idle");
    let ended: Vec<_> = seen.iter().filter(|e| e.1 == "session.ended").collect();
    assert_eq!(ended.len(), 1, "{seen:?}");
    assert_eq!(ended[0].2["session_id"], lost["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_creator_closes_a_space_and_a_closed_space_takes_nobody() {
    let world = World::start(2, &[]).await;
    let owner = world.paid("owner").await;
    let other = world.paid("other").await;
    world.space(&owner, "atelier", 10, "0.20").await;
    world.session(&other, "0.50", None).await;
    let (status, _) = world
        .call(0, Method::POST, "/spaces/atelier/join", Some(&other), None)
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        world.read(1, "/spaces?active=true").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (status, body) = world
        .call(1, Method::POST, "/spaces/atelier/close", Some(&other), None)
        .await;
    assert_eq!(status, 403);
    assert_eq!(code(&body), "forbidden");
    assert!(message(&body).contains("only the creator"), "{body}");
    let space = world.read(1, "/spaces/atelier").await;
    assert_eq!(space["is_active"], true);
    assert_eq!(space["participant_count"], 1);

    let (status, body) = world
        .call(0, Method::POST, "/spaces/atelier/close", Some(&owner), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["is_active"], false);
    assert_eq!(body["participant_count"], 0);
    assert!(body["closed_at"].is_string());
    // Every instance sees it closed at once, in details, participants and lists.
    let space = world.read(1, "/spaces/atelier").await;
    assert_eq!(space["is_active"], false);
    assert_eq!(
        world.read(1, "/spaces/atelier/participants").await["count"],
        0
    );
    assert_eq!(
        world.read(1, "/spaces?active=true").await["items"],
        json!([])
    );
    assert_eq!(
        world.read(1, "/spaces?active=false").await["items"][0]["space_id"],
        "atelier"
    );

    let (status, body) = world
        .call(1, Method::POST, "/spaces/atelier/join", Some(&other), None)
        .await;
    assert_eq!(status, 409);
    assert!(message(&body).contains("closed"), "{body}");
    // Closed comes first: even without a session, the answer is that it is closed.
    let stranger = world.register("stranger").await;
    let (status, body) = world
        .call(
            0,
            Method::POST,
            "/spaces/atelier/join",
            Some(&stranger),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = world
        .call(
            1,
            Method::POST,
            "/consciousness/sessions",
            Some(&other),
            Some(json!({"space_id": "atelier", "consciousness_level": "0.9"})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        world.count("SELECT count(*) FROM space_participants").await,
        0
    );
    // Closing again is no error and changes nothing.
    let (status, _) = world
        .call(0, Method::POST, "/spaces/atelier/close", Some(&owner), None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_cannot_create_a_space_until_their_tier_is_paid() {
    let world = World::start(2, &[]).await;
    let ana = world.register("ana").await;
    // "No such space" is cached briefly on both instances; the create must remove it.
    for n in 0..2 {
        let (status, _) = world.call(n, Method::GET, "/spaces/mine", None, None).await;
        assert_eq!(status, 404);
    }
    let body = json!({"space_id": "mine", "title": "Mine"});
    let (status, answer) = world
        .call(0, Method::POST, "/spaces", Some(&ana), Some(body.clone()))
        .await;
    assert_eq!(status, 403);
    assert_eq!(code(&answer), "forbidden");
    assert!(
        message(&answer).contains("paid subscription tier"),
        "{answer}"
    );
    assert!(message(&answer).contains("observer"), "{answer}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM collaboration_spaces")
            .await,
        0
    );
    // Observers still read, start sessions and join (tiers.rs).
    assert_eq!(world.read(0, "/spaces").await["items"], json!([]));
    world.session(&ana, "0.60", None).await;

    // A tier change applies to the next request, on every instance, with the same token.
    world.set_tier("ana", "architect").await;
    let (status, answer) = world
        .call(1, Method::POST, "/spaces", Some(&ana), Some(body.clone()))
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["creator"], "ana");
    assert_eq!(answer["max_participants"], 10);
    assert_eq!(answer["consciousness_threshold"], "0.50");
    for n in 0..2 {
        assert_eq!(world.read(n, "/spaces/mine").await["creator"], "ana");
    }
    let (status, answer) = world
        .call(0, Method::POST, "/spaces", Some(&ana), Some(body))
        .await;
    assert_eq!(status, 409, "{answer}");
    world.set_tier("ana", "observer").await;
    let (status, _) = world
        .call(
            0,
            Method::POST,
            "/spaces",
            Some(&ana),
            Some(json!({"space_id": "second", "title": "Second"})),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_follow_cursors_and_show_writes_at_once_on_every_instance() {
    let world = World::start(2, &[]).await;
    let ana = world.paid("ana").await;
    let bob = world.paid("bob").await;
    for i in 0..5 {
        world.space(&ana, &format!("ana-{i}"), 10, "0.50").await;
    }
    world.space(&bob, "bob-0", 10, "0.50").await;

    // Newest first, two by two, by cursor; read on instance 1 (cached there).
    let mut seen = Vec::new();
    let mut path = "/spaces?creator=ANA&limit=2".to_string();
    for _ in 0..5 {
        let page = world.read(1, &path).await;
        for item in page["items"].as_array().unwrap() {
            assert!(item.get("participant_count").is_none());
            seen.push(item["space_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/spaces?creator=ana&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["ana-4", "ana-3", "ana-2", "ana-1", "ana-0"]);
    assert_eq!(
        world.read(1, "/spaces").await["items"][0]["space_id"],
        "bob-0"
    );

    // A create on instance 0 shows on instance 1's cached first pages.
    world.space(&ana, "ana-5", 10, "0.50").await;
    let page = world.read(1, "/spaces?creator=ana&limit=2").await;
    assert_eq!(page["items"][0]["space_id"], "ana-5");
    assert_eq!(
        world.read(1, "/spaces").await["items"][0]["space_id"],
        "ana-5"
    );
    // A close on instance 0 takes it out of instance 1's cached active lists.
    let (status, _) = world
        .call(0, Method::POST, "/spaces/ana-5/close", Some(&ana), None)
        .await;
    assert_eq!(status, 200);
    let page = world
        .read(1, "/spaces?creator=ana&limit=2&active=true")
        .await;
    assert_eq!(page["items"][0]["space_id"], "ana-4");
    let listed = world.read(1, "/spaces?active=true").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 6);

    // Entries live in their namespaces under the configured prefix.
    let keys = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &world.redis.port().to_string(),
            "--scan",
            "--pattern",
            "cascade:space_lists:*",
        ])
        .output()
        .unwrap();
    assert!(!keys.stdout.is_empty(), "list pages are cached in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_closes_are_published_as_domain_events_to_every_instance() {
    let world = World::start(2, &[]).await;
    for server in &world.servers {
        assert!(server.events_listening(Duration::from_secs(10)).await);
    }
    let mut events = world.servers[1].events.subscribe();
    let owner = world.paid("owner").await;
    world.space(&owner, "piazza", 10, "0.50").await;
    let ana = world.register("ana").await;
    world.session(&ana, "0.85", None).await;
    let (status, _) = world
        .call(0, Method::POST, "/spaces/piazza/join", Some(&ana), None)
        .await;
    assert_eq!(status, 201);
    let (status, _) = world
        .call(0, Method::POST, "/spaces/piazza/close", Some(&owner), None)
        .await;
    assert_eq!(status, 200);

    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(1000), events.recv()).await
    {
        seen.push((
            (event.channel.clone(), event.kind.clone()),
            event.data.clone(),
        ));
    }
    let kinds: Vec<(&str, &str)> = seen
        .iter()
        .map(|((c, k), _)| (c.as_str(), k.as_str()))
        .collect();
    let user = |kind: &'static str| {
        seen.iter()
            .any(|((c, k), _)| c.starts_with("user:") && k == kind)
    };
    assert!(
        kinds.contains(&("cascade-events", "space.created")),
        "{kinds:?}"
    );
    assert!(user("session.started"), "{kinds:?}");
    assert!(user("session.verified"), "0.85 reaches 0.8: {kinds:?}");
    assert!(
        kinds.contains(&("space:piazza", "space.joined")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("space:piazza", "space.closed")),
        "{kinds:?}"
    );
    let joined = &seen
        .iter()
        .find(|((_, k), _)| k == "space.joined")
        .unwrap()
        .1;
    assert_eq!(joined["username"], "ana");
    assert_eq!(joined["participant_count"], 1);
    let closed = &seen
        .iter()
        .find(|((c, k), _)| c == "space:piazza" && k == "space.closed")
        .unwrap()
        .1;
    assert_eq!(closed["participants_left"], 1);
}
