//! `POST /me/citizen` and `DELETE /me/citizen`: an account links a citizen the Venice ledger
//! knows, one account per citizen (the database decides, also under a race), and `GET /me`
//! shows the link.

use serde_json::{Value, json};

use crate::support::World;

async fn error_code(response: reqwest::Response) -> String {
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        response.headers()
    );
    let body: Value = response.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("the JSON error shape: {body}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_a_known_citizen_shows_on_me() {
    let world = World::start(&[]).await;
    let token = world.register("alice").await;
    assert_eq!(world.me(&token).await["venice_username"], Value::Null);

    let response = world.link_citizen(&token, "Foscari_Banker").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["venice_username"], "Foscari_Banker");
    assert!(body["linked_at"].as_str().is_some(), "{body}");
    assert_eq!(world.me(&token).await["venice_username"], "Foscari_Banker");
    assert!(
        world
            .account_row("alice")
            .await
            .starts_with("Foscari_Banker|t|")
    );

    // Linking again is the same link; linking another citizen replaces it.
    assert_eq!(
        world.link_citizen(&token, "Foscari_Banker").await.status(),
        200
    );
    assert_eq!(world.link_citizen(&token, "Italia").await.status(), 200);
    assert_eq!(world.me(&token).await["venice_username"], "Italia");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_an_unknown_citizen_is_refused_and_nothing_is_written() {
    let world = World::start(&[]).await;
    let token = world.register("alice").await;
    let before = world.account_row("alice").await;
    assert!(before.starts_with("-|f|"), "{before}");

    let response = world.link_citizen(&token, "Nobody_Here").await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "not_found");
    assert_eq!(world.venice.ledger_calls(), 1, "Venice was asked");
    assert_eq!(world.account_row("alice").await, before);
    assert_eq!(world.me(&token).await["venice_username"], Value::Null);

    // Refused while linked too: the existing link stays.
    assert_eq!(world.link_citizen(&token, "Italia").await.status(), 200);
    let linked = world.account_row("alice").await;
    assert_eq!(
        world.link_citizen(&token, "Nobody_Here").await.status(),
        404
    );
    assert_eq!(world.account_row("alice").await, linked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_citizen_cannot_be_taken_by_another_account_until_unlinked() {
    let world = World::start(&[]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    assert_eq!(world.link_citizen(&alice, "sea_trader").await.status(), 200);
    let bob_before = world.account_row("bob").await;

    let response = world.link_citizen(&bob, "sea_trader").await;
    assert_eq!(response.status(), 409);
    assert_eq!(error_code(response).await, "conflict");
    assert_eq!(world.account_row("bob").await, bob_before);
    assert_eq!(world.me(&alice).await["venice_username"], "sea_trader");

    // Unlinking frees it (and unlinking twice is no error).
    let response = world.unlink(Some(&alice)).await;
    assert_eq!(response.status(), 204);
    assert_eq!(world.unlink(Some(&alice)).await.status(), 204);
    assert_eq!(world.me(&alice).await["venice_username"], Value::Null);
    assert!(world.account_row("alice").await.starts_with("-|f|"));

    assert_eq!(world.link_citizen(&bob, "sea_trader").await.status(), 200);
    assert_eq!(world.me(&bob).await["venice_username"], "sea_trader");
    assert_eq!(world.link_citizen(&alice, "sea_trader").await.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_linking_one_citizen_at_once_one_wins_one_gets_409() {
    let world = World::start(&[]).await;
    let alice = world.register("alice").await;
    let bob = world.register("bob").await;
    for round in 0..5 {
        let citizen = format!("racer_{round}");
        world.venice.set_citizen(
            &citizen,
            json!({"success": true, "citizen": {"username": citizen}}),
        );
        let (a, b) = tokio::join!(
            world.link_citizen(&alice, &citizen),
            world.link_citizen(&bob, &citizen)
        );
        let mut statuses = [a.status().as_u16(), b.status().as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "round {round}");
        let loser = if a.status() == 409 { a } else { b };
        assert_eq!(error_code(loser).await, "conflict");
        let linked = [
            world.me(&alice).await["venice_username"].clone(),
            world.me(&bob).await["venice_username"].clone(),
        ];
        assert_eq!(
            linked.iter().filter(|v| **v == json!(citizen)).count(),
            1,
            "round {round}: {linked:?}"
        );
        assert_eq!(world.unlink(Some(&alice)).await.status(), 204);
        assert_eq!(world.unlink(Some(&bob)).await.status(), 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_json_error_and_nothing_is_written() {
    let world = World::start(&[]).await;
    let token = world.register("alice").await;
    let before = world.account_row("alice").await;
    let long = "a".repeat(10 * 1024);
    let bodies = [
        json!({"venice_username": "Foscari\u{1}Banker"}).to_string(),
        json!({"venice_username": "Foscari\nBanker"}).to_string(),
        json!({"venice_username": "Foscari\u{0}Banker"}).to_string(),
        json!({ "venice_username": long }).to_string(),
        json!({"venice_username": ""}).to_string(),
        json!({"venice_username": "../Italia"}).to_string(),
        json!({"venice_username": 5}).to_string(),
        json!({"venice_username": null}).to_string(),
        json!({}).to_string(),
        json!({"venice_username": "Italia", "tier": "architect"}).to_string(),
        "[]".to_string(),
        "{\"venice_username\":".to_string(),
    ];
    for body in bodies {
        let response = world.link(Some(&token), body.clone()).await;
        assert_eq!(response.status(), 400, "{body:.80}");
        assert_eq!(error_code(response).await, "bad_request", "{body:.80}");
    }
    assert_eq!(world.account_row("alice").await, before);
    assert_eq!(
        world.venice.ledger_calls(),
        0,
        "bad input never reaches Venice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_is_a_401() {
    let world = World::start(&[]).await;
    let body = json!({"venice_username": "Italia"}).to_string();
    let response = world.link(None, body.clone()).await;
    assert_eq!(response.status(), 401);
    assert_eq!(error_code(response).await, "unauthorized");
    let response = world.link(Some("not.a.jwt"), body).await;
    assert_eq!(response.status(), 401);
    let response = world.unlink(None).await;
    assert_eq!(response.status(), 401);
    assert_eq!(error_code(response).await, "unauthorized");
    assert_eq!(world.venice.ledger_calls(), 0);
}
