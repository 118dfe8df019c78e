//! `POST /billing/checkout`: a session through Stripe's API with an Idempotency-Key on every
//! POST, so a checkout retried after a timeout creates one customer and one session; and the
//! whole flow: checkout, payment at Stripe, webhooks, the new tier.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{World, http};

impl World {
    /// `POST /billing/checkout` as `token`, with the same client Idempotency-Key each time.
    async fn checkout(&self, token: &str, tier: &str) -> reqwest::Response {
        http()
            .post(self.url(0, "/billing/checkout"))
            .bearer_auth(token)
            .header("idempotency-key", "attempt-1")
            .json(&json!({ "tier": tier }))
            .send()
            .await
            .expect("the server answers")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_retried_after_a_timeout_creates_one_customer_and_one_session() {
    let world = World::start(1, &[("STRIPE_REQUEST_TIMEOUT", "1s".to_string())]).await;
    let (user, token) = world.register("alice").await;

    // Stripe does the work but answers too late: the caller gets a 503.
    world.stripe.slow_down(Duration::from_millis(1500));
    let response = world.checkout(&token, "architect").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert_eq!(world.stripe.customers(), 1, "Stripe created the customer");

    // The retry replays the customer's key, and creates the session once.
    world.stripe.slow_down(Duration::ZERO);
    let response = world.checkout(&token, "architect").await;
    assert_eq!(response.status(), 200);
    let first: Value = response.json().await.unwrap();
    assert!(
        first["url"].as_str().unwrap().starts_with("https://"),
        "{first}"
    );
    let again: Value = world
        .checkout(&token, "architect")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["id"], first["id"],
        "a second click gets the same session"
    );
    assert_eq!(world.stripe.customers(), 1);
    assert_eq!(world.stripe.sessions().len(), 1);
    assert!(
        world.stripe.calls("/v1/customers") >= 2,
        "the customer call was retried"
    );
    let session = &world.stripe.sessions()[0];
    assert_eq!(session["client_reference_id"], user.to_string());
    assert_eq!(session["line_items"][0]["price"], "price_architect");

    // Paid at Stripe; its webhooks make the account an architect, on the next request.
    let session_id = first["id"].as_str().unwrap();
    let subscription = world.stripe.complete_checkout(session_id).unwrap();
    let delivered = world.deliver_all().await;
    assert!(delivered.dropped.is_empty());
    let body: Value = world.subscription(0, &token).await.json().await.unwrap();
    assert_eq!(body["tier"], "architect");
    assert_eq!(body["gate_tier"], "architect");
    assert_eq!(body["subscription"]["id"], subscription.as_str());
    assert_eq!(body["subscription"]["status"], "active");

    // The customer portal, for the customer the checkout created.
    let response = http()
        .post(world.url(0, "/billing/portal"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let portal: Value = response.json().await.unwrap();
    assert!(
        portal["url"].as_str().unwrap().starts_with("https://"),
        "{portal}"
    );
    assert_eq!(world.stripe.calls("/v1/billing_portal/sessions"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_for_a_tier_without_a_price_is_a_400_and_calls_nobody() {
    let world = World::start(1, &[]).await;
    let (_, token) = world.register("bob").await;
    for tier in ["observer", "emperor", ""] {
        let response = world.checkout(&token, tier).await;
        assert_eq!(response.status(), 400, "{tier}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], "tier");
    }
    assert_eq!(world.stripe.calls("/v1/customers"), 0);
    // No customer yet: no portal.
    let response = http()
        .post(world.url(0, "/billing/portal"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(world.stripe.calls("/v1/billing_portal/sessions"), 0);
}
