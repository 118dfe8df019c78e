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
async fn when_stripe_is_unreachable_the_event_is_a_503_that_leaves_no_trace() {
    let world = World::start(1, &[]).await;
    let (user, _) = world.register("ines").await;
    world
        .stripe
        .create_subscription(None, user, "price_architect");
    let invoice = world.stripe.events()[1].to_string();
    // Stripe answers 500: the fetch fails; Stripe will retry the delivery.
    world.stripe.outage(Some(500));
    let (status, body) = world.post_signed(&invoice).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        world.state_of(user).await,
        ("observer".to_string(), vec![], 0)
    );
}

/// Stripe cannot be asked at all (no key, or a key Stripe refuses): retrying would not help,
/// so the event is decided by the clocks alone, as if Stripe had no such subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_usable_api_key_an_event_in_doubt_is_decided_by_the_clocks() {
    for (key, reason, name) in [
        (String::new(), "no_api_key", "jan"),
        (format!("{TEST_KEY}_revoked"), "api_key_refused", "kim"),
    ] {
        let world = World::start(1, &[("STRIPE_API_KEY", key)]).await;
        let (user, _) = world.register(name).await;
        let sub = world
            .stripe
            .create_subscription(None, user, "price_architect");
        let label = format!("outcome=\"decided_without_stripe\",reason=\"{reason}\"");
        let counted = world.webhook_metric(&label).await;
        // The invoice of a subscription never seen here: recorded, no effect (was a 503
        // forever).
        let invoice = world.stripe.events()[1].clone();
        assert_eq!(world.send(&invoice).await, "applied", "{reason}");
        assert_eq!(
            world.state_of(user).await,
            ("observer".to_string(), vec![], 1),
            "{reason}"
        );
        assert_eq!(world.webhook_metric(&label).await, counted + 1, "{reason}");
        // Two updates of the same second with different prices: the later arrival wins.
        let created = world.stripe.events()[0].clone();
        assert_eq!(world.send(&created).await, "applied", "{reason}");
        let mut same_second = created.clone();
        same_second["id"] = json!(format!("evt_same_second_{name}"));
        same_second["type"] = json!("customer.subscription.updated");
        same_second["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_explorer");
        assert_eq!(world.send(&same_second).await, "applied", "{reason}");
        assert_eq!(world.webhook_metric(&label).await, counted + 2, "{reason}");
        let (tier, subs, events) = world.state_of(user).await;
        assert_eq!(
            (tier.as_str(), subs, events),
            ("explorer", vec![format!("{sub}:active:explorer")], 3),
            "{reason}"
        );
    }
}

/// Stripe's copy wins a tie on the status too, not only on the price: a status further along
/// (`unpaid`) of the same second does not outrank what Stripe says now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripes_copy_wins_the_tie_on_the_status_as_well() {
    let world = World::start(1, &[]).await;
    let (user, _) = world.register("lea").await;
    let sub = world
        .stripe
        .create_subscription(None, user, "price_architect");
    let truth = world.stripe.events()[0].clone();
    let mut stale = truth.clone();
    stale["id"] = json!("evt_stale_unpaid");
    stale["type"] = json!("customer.subscription.updated");
    stale["data"]["object"]["status"] = json!("unpaid");
    stale["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_explorer");
    assert_eq!(world.send(&stale).await, "applied");
    assert_eq!(world.state_of(user).await.0, "observer");
    // Same second, another price: in doubt; Stripe says active, architect.
    assert_eq!(world.send(&truth).await, "applied");
    assert_eq!(world.stripe.calls("/v1/subscriptions"), 1);
    let (tier, subs, _) = world.state_of(user).await;
    assert_eq!(
        (tier.as_str(), subs),
        ("architect", vec![format!("{sub}:active:architect")])
    );
}

/// A subscription to a price `STRIPE_PRICES_JSON` does not name, even the most recent one,
/// does not hide the account's paid subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_an_unknown_price_does_not_hide_a_paid_one() {
    let world = World::start(1, &[]).await;
    let (user, _) = world.register("max").await;
    world
        .stripe
        .create_subscription(None, user, "price_architect");
    world
        .stripe
        .create_subscription(None, user, "price_not_in_the_table");
    world.deliver_all().await;
    let (tier, subs, _) = world.state_of(user).await;
    assert_eq!(tier, "architect", "{subs:?}");
    assert_eq!(subs.len(), 2, "{subs:?}");
}
