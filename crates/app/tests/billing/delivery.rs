//! Stripe's delivery as it is: the same event more than once (also at the same moment on two
//! instances), events out of order. Each event has one effect, and the newest state wins.

use cascade_testkit::stripe::{signature_header, unix_now};
use serde_json::Value;

use crate::support::{SECRET, World, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_twice_has_one_effect() {
    let world = World::start(1, &[]).await;
    let (user, _) = world.register("alice").await;
    world
        .stripe
        .create_subscription(None, user, "price_explorer");
    let created = world.stripe.events()[0].to_string();
    let (status, first) = world.post_signed(&created).await;
    assert_eq!((status, first["outcome"].as_str()), (200, Some("applied")));
    let after_first = world.state_of(user).await;
    assert_eq!(after_first.0, "explorer");
    // The process's metrics recorder is shared with concurrent tests: at least one more.
    let duplicates = world.webhook_metric("outcome=\"duplicate\"").await;
    let (status, second) = world.post_signed(&created).await;
    assert_eq!(
        (status, second["outcome"].as_str()),
        (200, Some("duplicate"))
    );
    assert_eq!(world.state_of(user).await, after_first);
    assert!(world.webhook_metric("outcome=\"duplicate\"").await > duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_delivered_concurrently_to_two_instances_is_applied_once() {
    let world = World::start(2, &[]).await;
    let (user, token) = world.register("bob").await;
    // Each round: a new event, delivered 8 times at once, half to each instance.
    for (round, price) in ["price_explorer", "price_architect", "price_explorer"]
        .into_iter()
        .enumerate()
    {
        let before = world.stripe.events().len();
        if round == 0 {
            world.stripe.create_subscription(None, user, price);
        } else {
            let sub = world.stripe.events()[0]["data"]["object"]["id"]
                .as_str()
                .unwrap()
                .to_string();
            world.stripe.change_price(&sub, price);
        }
        let body = world.stripe.events()[before].to_string();
        let header = signature_header(&[SECRET], unix_now(), body.as_bytes());
        let sends = (0..8).map(|i| {
            let request = http()
                .post(world.webhook(i % 2))
                .header("content-type", "application/json")
                .header("stripe-signature", header.clone())
                .body(body.clone());
            async move {
                let response = request.send().await.expect("the server answers");
                assert_eq!(response.status(), 200);
                let answer: Value = response.json().await.unwrap();
                answer["outcome"].as_str().unwrap().to_string()
            }
        });
        let outcomes = futures_util::future::join_all(sends).await;
        let applied = outcomes.iter().filter(|o| *o == "applied").count();
        let duplicates = outcomes.iter().filter(|o| *o == "duplicate").count();
        assert_eq!((applied, duplicates), (1, 7), "round {round}: {outcomes:?}");
        let tier = if price == "price_explorer" {
            "explorer"
        } else {
            "architect"
        };
        assert_eq!(world.state_of(user).await.0, tier, "round {round}");
        // The tier gates on both instances see it on the next request.
        for instance in 0..2 {
            let body: Value = world
                .subscription(instance, &token)
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(body["tier"], tier);
            // A tier named only in STRIPE_PRICES_JSON (explorer) is the session's tier as it
            // is: the platform ranks no tiers, the application's tier table decides.
            assert_eq!(
                body["gate_tier"], tier,
                "instance {instance}, round {round}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_event_after_a_newer_one_leaves_the_newer_state() {
    let world = World::start(1, &[]).await;
    let (user, token) = world.register("carol").await;
    let sub = world
        .stripe
        .create_subscription(None, user, "price_explorer"); // 0, 1
    world.stripe.change_price(&sub, "price_architect"); // 2: the older update
    world.stripe.change_price(&sub, "price_explorer"); // 3: the newer update
    world.stripe.fail_payment(&sub); // 4: invoice.payment_failed, 5: updated (past_due)
    world.stripe.mark_unpaid(&sub); // 6: updated (unpaid: Stripe's retries are exhausted)
    world.stripe.cancel(&sub); // 7: deleted
    let events = world.stripe.events();
    let send = |i: usize| world.post_signed_owned(events[i].to_string());
    let rows = |status: &str, tier: &str| vec![format!("{sub}:{status}:{tier}")];

    for i in [0, 3] {
        assert_eq!(send(i).await.0, 200);
    }
    assert_eq!(world.state_of(user).await.1, rows("active", "explorer"));
    // The payment failure: past_due keeps the tier (Stripe is still retrying: the grace).
    assert_eq!(send(4).await.0, 200);
    assert_eq!(world.state_of(user).await.1, rows("past_due", "explorer"));
    assert_eq!(world.state_of(user).await.0, "explorer");
    assert_eq!(send(5).await.0, 200);
    // Unpaid: past the grace, back to observer.
    assert_eq!(send(6).await.0, 200);
    assert_eq!(world.state_of(user).await.0, "observer");
    assert_eq!(world.state_of(user).await.1, rows("unpaid", "explorer"));

    // The older update (architect, active) arrives now, first time: recorded, no effect.
    let (status, answer) = send(2).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("older")));
    assert_eq!(world.state_of(user).await.1, rows("unpaid", "explorer"));
    assert_eq!(world.state_of(user).await.0, "observer");

    // Deleted; the first invoice.paid, delayed until now, changes nothing.
    assert_eq!(send(7).await.0, 200);
    assert_eq!(send(1).await.1["outcome"], "older");
    assert_eq!(world.state_of(user).await.1, rows("canceled", "explorer"));
    let body: Value = world.subscription(0, &token).await.json().await.unwrap();
    assert_eq!(body["tier"], "observer");
    assert_eq!(body["subscription"]["status"], "canceled");
    assert_eq!(world.state_of(user).await.2, 8);
}

impl World {
    /// [`World::post_signed`] for an owned body (closures over the event list).
    async fn post_signed_owned(&self, body: String) -> (u16, Value) {
        self.post_signed(&body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_killed_mid_delivery_then_stripe_retries_lose_and_double_nothing() {
    use std::time::Duration;

    use cascade_testkit::stripe::Delivery;

    use crate::checker::{actual, add_accounts, expected, script};

    let mut world = World::start(1, &[]).await;
    add_accounts(&world.pg.client(&world.database).await, 30).await;
    script(&world.stripe, 30);
    let events = world.stripe.events();
    let third = events.len() / 3;
    let url = world.webhook(0);
    let shuffled = |seed| Delivery {
        seed,
        shuffle: true,
        duplicate: 0.2,
        concurrency: 4,
        ..Delivery::default()
    };
    let first = world
        .stripe
        .deliver(&url, SECRET, &events[..third], shuffled(1))
        .await;
    assert!(first.dropped.is_empty());

    // The second third is being delivered when PostgreSQL dies (SIGKILL).
    let paced = Delivery {
        delay: Duration::from_millis(10),
        ..shuffled(2)
    };
    let (during, ()) = tokio::join!(
        world
            .stripe
            .deliver(&url, SECRET, &events[third..2 * third], paced),
        async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            world.pg.kill();
        }
    );
    assert!(!during.dropped.is_empty(), "some deliveries failed");
    assert!(
        during.statuses.iter().all(|s| [200, 500, 503].contains(s)),
        "{:?}",
        during.statuses
    );
    world.pg.restart().await;

    // Stripe retries what failed, and delivers the rest (shuffled, with duplicates).
    let failed: Vec<String> = during.dropped;
    let mut pending: Vec<_> = events
        .iter()
        .filter(|e| failed.iter().any(|id| e["id"] == id.as_str()))
        .chain(&events[2 * third..])
        .cloned()
        .collect();
    for round in 0..20 {
        if pending.is_empty() {
            break;
        }
        let delivered = world
            .stripe
            .deliver(&url, SECRET, &pending, shuffled(10 + round))
            .await;
        pending.retain(|e| delivered.dropped.iter().any(|id| e["id"] == id.as_str()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        pending.is_empty(),
        "{} events never accepted",
        pending.len()
    );
    assert_eq!(
        actual(&world.pg, &world.database).await,
        expected(&world.stripe)
    );
    assert_eq!(
        world.state_of(1).await.2 as usize,
        events.len(),
        "each event once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_inside_processing_is_a_500_that_leaves_no_trace() {
    let world = World::start(1, &[]).await;
    let (user, _) = world.register("dora").await;
    let before = world.state_of(user).await;
    // Handled types without a field their handling needs: the dedupe row is rolled back with
    // the rest, so Stripe's retry (of a corrected event, or after a fix) is processed.
    let broken = [
        serde_json::json!({"id": "evt_broken_1", "type": "customer.subscription.updated",
            "created": 1_700_000_000,
            "data": {"object": {"id": "sub_x", "customer": "cus_x",
                                "metadata": {"cascade_user_id": user.to_string()}}}}),
        serde_json::json!({"id": "evt_broken_2", "type": "customer.subscription.created",
            "created": 1_700_000_001,
            "data": {"object": {"id": "sub_y", "customer": "cus_y",
                                "metadata": {"cascade_user_id": user.to_string()}}}}),
    ];
    for event in &broken {
        let (status, body) = world.post_signed(&event.to_string()).await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["error"]["code"], "internal");
    }
    assert_eq!(world.state_of(user).await, before);
    // A checkout that is not ours to act on (no customer: a one-off payment, another
    // product's payment link) is acknowledged without effect, not retried by Stripe for days.
    let foreign = serde_json::json!({"id": "evt_foreign", "type": "checkout.session.completed",
        "created": 1_700_000_002,
        "data": {"object": {"id": "cs_x", "client_reference_id": user.to_string(), "mode": "payment"}}});
    let (status, body) = world.post_signed(&foreign.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let bare = serde_json::json!({"id": "evt_no_customer", "type": "checkout.session.completed",
        "created": 1_700_000_003,
        "data": {"object": {"id": "cs_y", "client_reference_id": user.to_string()}}});
    let (status, body) = world.post_signed(&bare.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let after = world.state_of(user).await;
    assert_eq!(
        (after.0, after.1),
        (before.0.clone(), before.1.clone()),
        "no effect from a foreign checkout"
    );
    // An unknown type is acknowledged and changes nothing either.
    let unknown = r#"{"id":"evt_other","type":"charge.refunded","created":1,"data":{"object":{}}}"#;
    let (status, body) = world.post_signed(unknown).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    // Only the two acknowledged checkouts are recorded as processed.
    assert_eq!(
        world.state_of(user).await,
        (before.0, before.1, before.2 + 2)
    );
}

/// A tier change is announced as `tier_changed` on `user:{id}`, heard by the other instance,
/// in the order the changes were committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_is_published_as_tier_changed_to_every_instance() {
    use std::time::Duration;

    let world = World::start(2, &[]).await;
    let (user, _) = world.register("flora").await;
    let mut heard = world.servers[1].events.subscribe();
    let sub = world
        .stripe
        .create_subscription(None, user, "price_explorer"); // created, invoice.paid
    world.stripe.change_price(&sub, "price_architect"); // updated
    let events = world.stripe.events();
    // Created (a tier), invoice.paid (no tier change), updated (another tier), on instance 0.
    for event in &events {
        assert_eq!(world.post_signed(&event.to_string()).await.0, 200);
    }
    let channel = format!("user:{user}");
    let mut changes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while changes.len() < 2 {
        let event = tokio::time::timeout_at(deadline, heard.recv())
            .await
            .expect("two tier_changed events within 10 s")
            .expect("the subscription keeps up");
        if event.channel == channel && event.kind == "tier_changed" {
            // Published by instance 0, which processed the webhooks; heard on instance 1.
            assert_eq!(event.origin, world.servers[0].events.instance_id());
            changes.push(event.data.clone());
        }
    }
    assert_eq!(
        changes,
        [
            serde_json::json!({"user_id": user, "from": "observer", "to": "explorer"}),
            serde_json::json!({"user_id": user, "from": "explorer", "to": "architect"}),
        ]
    );
    assert_eq!(world.state_of(user).await.0, "architect");
}
