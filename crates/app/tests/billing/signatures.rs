//! `POST /webhooks/stripe` refuses what Stripe did not sign (and writes nothing), accepts both
//! secrets during a rotation, and billing answers 503 `billing_not_configured` without Stripe
//! settings while the rest of Cascade runs.

use cascade_testkit::stripe::{signature_header, unix_now};
use serde_json::Value;

use crate::support::{SECRET, World, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_stale_or_altered_deliveries_are_400s_that_change_nothing() {
    let world = World::start(1, &[]).await;
    let (user, token) = world.register("alice").await;
    world
        .stripe
        .create_subscription(None, user, "price_architect");
    let event = world.stripe.events()[0].to_string();
    assert!(event.contains("customer.subscription.created"), "{event}");
    let before = world.state_of(user).await;
    assert_eq!(before, ("observer".to_string(), vec![], 0));

    // The metrics recorder is the process's, shared by every test's instances: compare
    // before and after, at least (a concurrent test may refuse deliveries too).
    let reasons = [
        "bad_signature",
        "outside_tolerance",
        "missing_signature",
        "malformed_signature",
    ];
    let mut counted = Vec::new();
    for reason in reasons {
        counted.push(world.webhook_metric(&refused(reason)).await);
    }
    let now = unix_now();
    let zeros = format!("t={now},v1={}", "0".repeat(64));
    let altered = event.replace("active", "trialing");
    let cases: Vec<(&str, &str, Option<String>, &str)> = vec![
        ("a bad signature", &event, Some(zeros), "bad_signature"),
        (
            "the wrong secret",
            &event,
            Some(signature_header(
                &["whsec_someone_else"],
                now,
                event.as_bytes(),
            )),
            "bad_signature",
        ),
        (
            "a timestamp 301 s old",
            &event,
            Some(signature_header(&[SECRET], now - 301, event.as_bytes())),
            "outside_tolerance",
        ),
        (
            "a timestamp 301 s ahead",
            &event,
            // 301 s past the server's clock, which may have ticked a second past `now` (a
            // timestamp behind is only older by then, so -301 needs no such margin).
            Some(signature_header(&[SECRET], now + 302, event.as_bytes())),
            "outside_tolerance",
        ),
        ("no header", &event, None, "missing_signature"),
        (
            "a malformed header",
            &event,
            Some("v1=abc".to_string()),
            "malformed_signature",
        ),
        (
            "a body changed after signing",
            &altered,
            Some(signature_header(&[SECRET], now, event.as_bytes())),
            "bad_signature",
        ),
    ];
    for (case, body, header, _) in &cases {
        let (status, answer) = world.post_raw(body, header.clone()).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{case}");
        assert_eq!(answer["error"]["field"], "Stripe-Signature", "{case}");
    }
    assert_eq!(world.state_of(user).await, before, "nothing written");
    for (reason, before) in reasons.into_iter().zip(counted) {
        let expected = cases.iter().filter(|c| c.3 == reason).count() as u64;
        let after = world.webhook_metric(&refused(reason)).await;
        assert!(
            after >= before + expected,
            "{reason}: {before} then {after}"
        );
    }

    // Signed properly, the same body is applied.
    let (status, answer) = world.post_signed(&event).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("applied")));
    let body: Value = world.subscription(0, &token).await.json().await.unwrap();
    assert_eq!(body["tier"], "architect");
    assert_eq!(body["subscription"]["status"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_rotation_both_secrets_signatures_are_accepted() {
    let world = World::start(
        1,
        &[(
            "STRIPE_WEBHOOK_SECRET",
            "whsec_new_one, whsec_old_one".to_string(),
        )],
    )
    .await;
    let (user, _) = world.register("bob").await;
    let sub = world
        .stripe
        .create_subscription(None, user, "price_explorer");
    world.stripe.change_price(&sub, "price_architect");
    world.stripe.cancel(&sub);
    let events = world.stripe.events();
    let now = unix_now();
    let signers: [&[&str]; 4] = [
        &["whsec_old_one"],
        &["whsec_new_one"],
        &["whsec_new_one", "whsec_old_one"],
        &["whsec_old_one"],
    ];
    for (event, secrets) in events.iter().zip(signers) {
        let body = event.to_string();
        let header = signature_header(secrets, now, body.as_bytes());
        let (status, answer) = world.post_raw(&body, Some(header)).await;
        assert_eq!(
            (status, answer["outcome"].as_str()),
            (200, Some("applied")),
            "{secrets:?}"
        );
    }
    let (tier, subs, recorded) = world.state_of(user).await;
    assert_eq!(tier, "observer");
    assert_eq!(subs, vec![format!("{sub}:canceled:architect")]);
    assert_eq!(recorded, 4);
    // The secret that is no longer configured is refused.
    let body = events[0].to_string().replace(&sub, "sub_other");
    let header = signature_header(&["whsec_retired"], now, body.as_bytes());
    assert_eq!(world.post_raw(&body, Some(header)).await.0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stripe_settings_billing_is_503_and_the_rest_runs() {
    let world = World::start(
        1,
        &[
            ("STRIPE_API_KEY", String::new()),
            ("STRIPE_WEBHOOK_SECRET", String::new()),
        ],
    )
    .await;
    let (_, token) = world.register("carol").await;
    let response = world.subscription(0, &token).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "billing_not_configured", "{body}");
    let (status, body) = world.post_signed(r#"{"id":"evt_1"}"#).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "billing_not_configured");
    // The rest of Cascade: a Venice citizen, an account.
    let citizen = http()
        .get(world.url(0, "/citizens/Foscari_Banker"))
        .send()
        .await
        .unwrap();
    assert_eq!(citizen.status(), 200);
    let me = http()
        .get(world.url(0, "/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
}

fn refused(reason: &str) -> String {
    format!("outcome=\"refused\",reason=\"{reason}\"")
}
