//! "When in doubt, fetch the subscription from the API and apply that": events the clocks
//! cannot order are settled by Stripe's own copy of the subscription.

use cascade_testkit::stripe::TEST_KEY;
use serde_json::{Value, json};

use crate::support::World;

impl World {
    /// Posts event `event` (signed) to instance 0: its outcome.
    async fn send(&self, event: &Value) -> String {
        let (status, answer) = self.post_signed(&event.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        answer["outcome"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_updates_in_one_second_are_settled_by_stripes_copy_in_either_order() {
    let world = World::start(1, &[]).await;
    for (order, name) in [(0, "fay"), (1, "gus")] {
        let (user, _) = world.register(name).await;
        let before = world.stripe.events().len();
        let sub = world
            .stripe
            .create_subscription(None, user, "price_explorer");
        world.stripe.change_price(&sub, "price_architect");
        let events = world.stripe.events()[before..].to_vec();
        let truth = events[2].clone(); // Stripe's last word: architect.
        // Another update of the same second that Stripe has since superseded.
        let mut stale = truth.clone();
        stale["id"] = json!(format!("evt_same_second_{name}"));
        stale["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_explorer");
        assert_eq!(world.send(&events[0]).await, "applied");
        assert_eq!(world.send(&events[1]).await, "applied");
        let fetches = world.stripe.calls("/v1/subscriptions");
        // Without doubt, nothing is fetched.
        assert_eq!(fetches, order, "{name}");
        let (first, second) = if order == 0 {
            (&truth, &stale)
        } else {
            (&stale, &truth)
        };
        assert_eq!(world.send(first).await, "applied");
        assert_eq!(world.stripe.calls("/v1/subscriptions"), fetches, "{name}");
        // Same second, another price: the clocks cannot say which is newer; Stripe can.
        assert_eq!(world.send(second).await, "applied");
        assert_eq!(
            world.stripe.calls("/v1/subscriptions"),
            fetches + 1,
            "{name}"
        );
        let (tier, subs, _) = world.state_of(user).await;
        assert_eq!(
            (tier.as_str(), subs),
            ("architect", vec![format!("{sub}:active:architect")]),
            "{name}: the later arrival was {}",
            second["id"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_for_a_subscription_never_seen_here_applies_stripes_copy() {
    let world = World::start(1, &[]).await;
    let (user, token) = world.register("hana").await;
    let sub = world
        .stripe
        .create_subscription(None, user, "price_architect");
    // Its customer.subscription.created was lost; the invoice arrives.
    let invoice = world.stripe.events()[1].clone();
    assert_eq!(invoice["type"], "invoice.paid");
    assert_eq!(world.send(&invoice).await, "applied");
    assert_eq!(world.stripe.calls("/v1/subscriptions"), 1);
    let (tier, subs, events) = world.state_of(user).await;
    assert_eq!(
        (tier.as_str(), subs, events),
        ("architect", vec![format!("{sub}:active:architect")], 1)
    );
    let body: Value = world.subscription(0, &token).await.json().await.unwrap();
    assert_eq!(body["gate_tier"], "architect");
    // The lost event, delivered late, is older than Stripe's copy: no effect.
    assert_eq!(world.send(&world.stripe.events()[0]).await, "older");

    // An invoice of a subscription Stripe does not have either: recorded, no effect.
    let mut stray = invoice.clone();
    stray["id"] = json!("evt_stray_invoice");
    stray["data"]["object"]["subscription"] = json!("sub_unknown_anywhere");
    assert_eq!(world.send(&stray).await, "applied");
    assert_eq!(world.stripe.calls("/v1/subscriptions"), 2);
    assert_eq!(world.state_of(user).await.2, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_stripe_cannot_be_asked_the_event_is_a_503_that_leaves_no_trace() {
    // Stripe refuses our key: the fetch fails; Stripe will retry the delivery.
    let world = World::start(1, &[("STRIPE_API_KEY", format!("{TEST_KEY}_revoked"))]).await;
    let (user, _) = world.register("ines").await;
    world
        .stripe
        .create_subscription(None, user, "price_architect");
    let invoice = world.stripe.events()[1].to_string();
    let (status, body) = world.post_signed(&invoice).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        world.state_of(user).await,
        ("observer".to_string(), vec![], 0)
    );
}
