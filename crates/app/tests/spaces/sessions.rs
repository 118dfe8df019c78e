//! Consciousness sessions: one active per user per space, verified at the threshold, a user's
//! own (another user's session is a 404 and stays as it was).

use reqwest::Method;
use serde_json::json;

use crate::support::{World, code};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_session_cannot_be_changed_or_ended() {
    let world = World::start(1, &[]).await;
    let ana = world.register("ana").await;
    let eve = world.register("eve").await;
    let session = world.session(&ana, "0.40", None).await;
    let id = session["id"].as_i64().unwrap();
    let row = || async {
        world
            .sql()
            .await
            .query_one(
                "SELECT format('%s|%s|%s', consciousness_level, last_activity, is_active) \
                 FROM consciousness_sessions WHERE id = $1",
                &[&(id as i32)],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = row().await;
    let path = format!("/consciousness/sessions/{id}");
    for (method, path, body) in [
        (
            Method::PATCH,
            path.clone(),
            Some(json!({"consciousness_level": "0.99"})),
        ),
        (Method::POST, format!("{path}/heartbeat"), None),
        (Method::DELETE, path.clone(), None),
    ] {
        let (status, answer) = world.call(0, method.clone(), &path, Some(&eve), body).await;
        assert_eq!(status, 404, "{method} {path}: {answer}");
        assert_eq!(code(&answer), "not_found");
    }
    assert_eq!(row().await, before);
    // Ids nobody has, and ids that are no ids, answer the same.
    for bad in ["999999", "0", "-1", "abc", "1.5"] {
        let (status, answer) = world
            .call(
                0,
                Method::POST,
                &format!("/consciousness/sessions/{bad}/heartbeat"),
                Some(&ana),
                None,
            )
            .await;
        assert_eq!(status, 404, "{bad}: {answer}");
    }

    // Its owner can: the level changes, then the session ends (twice is no error).
    let (status, answer) = world
        .call(
            0,
            Method::PATCH,
            &path,
            Some(&ana),
            Some(json!({"consciousness_level": "0.99"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["consciousness_level"], "0.99");
    assert_eq!(answer["verified"], true);
    let (status, _) = world.call(0, Method::DELETE, &path, Some(&ana), None).await;
    assert_eq!(status, 204);
    let (status, _) = world.call(0, Method::DELETE, &path, Some(&ana), None).await;
    assert_eq!(status, 204);
    let (status, answer) = world
        .call(
            0,
            Method::PATCH,
            &path,
            Some(&ana),
            Some(json!({"consciousness_level": "0.50"})),
        )
        .await;
    assert_eq!(status, 409, "an ended session: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_session_per_user_per_space_even_when_asked_at_once() {
    let world = World::start(2, &[]).await;
    let owner = world.paid("owner").await;
    world.space(&owner, "room", 10, "0.10").await;
    let ana = world.register("ana").await;

    let body = json!({"space_id": "room", "consciousness_level": "0.5"});
    let answers = futures_util::future::join_all((0..8).map(|i| {
        world.call(
            i,
            Method::POST,
            "/consciousness/sessions",
            Some(&ana),
            Some(body.clone()),
        )
    }))
    .await;
    let created: Vec<_> = answers.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert!(answers.iter().all(|(s, _)| *s == 201 || *s == 409));
    let session = &created[0].1;
    assert_eq!(session["space_id"], "room");
    assert!(
        session["session_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("cs_"))
    );
    // One bound to no space may exist beside it, once.
    world.session(&ana, "0.30", None).await;
    let (status, _) = world
        .call(
            0,
            Method::POST,
            "/consciousness/sessions",
            Some(&ana),
            Some(json!({"consciousness_level": "0.30"})),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        world
            .count("SELECT count(*) FROM consciousness_sessions WHERE is_active")
            .await,
        2
    );

    // The join uses the session bound to the space; ending it takes the user out.
    let (status, joined) = world
        .call(1, Method::POST, "/spaces/room/join", Some(&ana), None)
        .await;
    assert_eq!(status, 201, "{joined}");
    let path = format!("/consciousness/sessions/{}", session["id"]);
    let (status, _) = world.call(1, Method::DELETE, &path, Some(&ana), None).await;
    assert_eq!(status, 204);
    assert_eq!(world.read(0, "/spaces/room").await["participant_count"], 0);
    assert_eq!(world.read(0, "/spaces/room/participants").await["count"], 0);
    world.session(&ana, "0.5", Some("room")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_verified_from_the_verification_threshold_exactly() {
    let world = World::start(1, &[("VERIFICATION_THRESHOLD", "0.75".to_string())]).await;
    let ana = world.register("ana").await;
    let session = world.session(&ana, "0.75", None).await;
    assert_eq!(session["verified"], true);
    assert_eq!(session["consciousness_level"], "0.75");
    assert_eq!(session["is_active"], true);
    let path = format!("/consciousness/sessions/{}", session["id"]);
    let (status, answer) = world
        .call(
            0,
            Method::PATCH,
            &path,
            Some(&ana),
            Some(json!({"consciousness_level": "0.74"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["verified"], false);
    assert!(answer.get("session_token").is_none());
    let level: String = world
        .sql()
        .await
        .query_one(
            "SELECT consciousness_level::text FROM consciousness_sessions",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "0.74", "stored exactly, NUMERIC(3,2)");
}
