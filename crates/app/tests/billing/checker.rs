//! The ordering checker: 200 subscriptions live scripted lives at the stand-in (created,
//! upgraded, downgraded, payments failing and recovering, unpaid, canceled: about two thousand
//! events). Delivered in order, and shuffled with 20 % duplicates, concurrently, for several
//! seeds, they leave the same subscriptions and tiers: Stripe's final state. Run three times:
//! one second per event; Stripe's bursts (the events of one action share a second); and two
//! actions a second (a failure and its recovery in one second), where only the fetch of
//! Stripe's copy can settle the ties.

use std::collections::BTreeMap;

use cascade_server::testing::TestApp;
use cascade_testkit::stripe::Delivery;
use cascade_testkit::venice::sample_citizens;
use cascade_testkit::{PgServer, RedisServer, StripeStandin, VeniceStandin};

use crate::support::{SECRET, billing_env};

const SUBSCRIPTIONS: i64 = 200;
const PRICES: [(&str, &str); 2] = [
    ("price_explorer", "explorer"),
    ("price_architect", "architect"),
];

/// Each account `1..=count` gets one subscription and a life of 1 to 7 changes; the script is
/// the same for every run (seeded).
pub fn script(stripe: &StripeStandin, count: i64) {
    let mut rng = fastrand::Rng::with_seed(16);
    for user in 1..=count {
        let mut price = rng.usize(..2);
        let sub = stripe.create_subscription(None, user, PRICES[price].0);
        let mut status = "active";
        for _ in 0..rng.usize(1..8) {
            match (status, rng.usize(..3)) {
                ("active", 0) => {
                    price = 1 - price;
                    stripe.change_price(&sub, PRICES[price].0);
                }
                ("active", 1) => {
                    stripe.fail_payment(&sub);
                    status = "past_due";
                }
                ("past_due", 0) => {
                    stripe.mark_unpaid(&sub);
                    status = "unpaid";
                }
                ("past_due" | "unpaid", 1) => {
                    stripe.pay(&sub);
                    status = "active";
                }
                (_, 2) => {
                    stripe.cancel(&sub);
                    break;
                }
                _ => {}
            }
        }
    }
}

/// What Stripe says, as Cascade should have it: user → `tier|subscription:status:tier`.
pub fn expected(stripe: &StripeStandin) -> BTreeMap<i64, String> {
    let tiers: BTreeMap<&str, &str> = PRICES.into_iter().collect();
    let mut out = BTreeMap::new();
    for event in stripe.events() {
        let object = &event["data"]["object"];
        if object["object"] != "subscription" {
            continue;
        }
        let sub = stripe.subscription(object["id"].as_str().unwrap()).unwrap();
        let user: i64 = sub["metadata"]["cascade_user_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let status = sub["status"].as_str().unwrap();
        let tier = tiers[sub["items"]["data"][0]["price"]["id"].as_str().unwrap()];
        let user_tier = if ["active", "trialing", "past_due"].contains(&status) {
            tier
        } else {
            "observer"
        };
        out.insert(
            user,
            format!(
                "{user_tier}|{}:{status}:{tier}",
                sub["id"].as_str().unwrap()
            ),
        );
    }
    out
}

pub async fn actual(pg: &PgServer, database: &str) -> BTreeMap<i64, String> {
    let db = pg.client(database).await;
    db.query(
        "SELECT u.id, format('%s|%s:%s:%s', u.subscription_tier, s.stripe_subscription_id, \
                s.status, s.tier) \
         FROM cascade_users u LEFT JOIN cascade_subscriptions s ON s.user_id = u.id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_duplicated_deliveries_end_as_in_order_delivery_for_every_seed() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let venice = VeniceStandin::start(sample_citizens()).await;
    // One second per event; then Stripe's bursts, the events of one action sharing a second
    // (the same-second tie rules and the fetch of Stripe's copy, at scale).
    for bursts in [0, 1, 2] {
        let stripe = StripeStandin::start().await;
        stripe.bursts(bursts);
        check_every_seed(&pg, &redis, &venice, &stripe).await;
        let fetches = stripe.calls("/v1/subscriptions");
        if bursts > 0 {
            let events = stripe.events();
            let shared = events
                .windows(2)
                .filter(|pair| pair[0]["created"] == pair[1]["created"])
                .count();
            // At least each signup's created and invoice.paid.
            assert!(
                shared >= SUBSCRIPTIONS as usize,
                "{shared} events share their second with the next"
            );
            assert!(
                fetches > 0,
                "bursts: in doubt, Stripe was asked ({fetches})"
            );
        }
    }
}

async fn check_every_seed(
    pg: &PgServer,
    redis: &RedisServer,
    venice: &VeniceStandin,
    stripe: &StripeStandin,
) {
    script(stripe, SUBSCRIPTIONS);
    let events = stripe.events();
    assert!(events.len() > 1000, "{} events", events.len());
    let truth = expected(stripe);
    assert_eq!(truth.len() as i64, SUBSCRIPTIONS);
    assert!(truth.values().any(|v| v.contains(":canceled:")));
    assert!(truth.values().any(|v| v.contains(":past_due:")));

    let in_order = Delivery::default();
    let plans = [1, 2, 3].map(|seed| Delivery {
        seed,
        shuffle: true,
        duplicate: 0.2,
        concurrency: 4,
        ..Delivery::default()
    });
    for plan in std::iter::once(in_order).chain(plans) {
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        let app = TestApp::start(&billing_env(url, redis, stripe, venice)).await;
        let db = pg.client(&database).await;
        add_accounts(&db, SUBSCRIPTIONS).await;
        let delivered = stripe
            .deliver(
                &format!("{}/webhooks/stripe", app.base),
                SECRET,
                &events,
                plan,
            )
            .await;
        assert!(
            delivered.dropped.is_empty(),
            "seed {}: {:?}",
            plan.seed,
            delivered.dropped
        );
        assert!(
            delivered.statuses.iter().all(|s| *s == 200),
            "seed {}",
            plan.seed
        );
        let state = actual(pg, &database).await;
        let wrong: Vec<_> = truth
            .iter()
            .filter(|(user, want)| state.get(user) != Some(want))
            .map(|(user, want)| format!("{user}: want {want}, got {:?}", state.get(user)))
            .collect();
        assert!(
            wrong.is_empty(),
            "seed {} (shuffled {}): {wrong:#?}",
            plan.seed,
            plan.shuffle
        );
        let recorded: i64 = db
            .query_one("SELECT count(*) FROM cascade_stripe_events", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(recorded as usize, events.len(), "each event once");
        drop(app);
    }
}

/// Accounts `1..=count` in a fresh database (ids are assigned in order).
pub async fn add_accounts(db: &tokio_postgres::Client, count: i64) {
    db.execute(
        "INSERT INTO cascade_users (username, password_hash) \
         SELECT 'user' || n, 'not-a-hash' FROM generate_series(1, $1::bigint) n",
        &[&count],
    )
    .await
    .unwrap();
}

/// The checker's missing part: 5 % of the events are never delivered (and the rest shuffled,
/// duplicated) to an instance that does not reconcile; the state is then wrong. A second
/// instance on the same database reconciles (`STRIPE_RECONCILE_INTERVAL` of 300 ms): the state
/// becomes that of in-order delivery, each event recorded once, and later runs change nothing.
/// For several seeds (each its own drops, order and duplicates, on a fresh database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_heals_dropped_deliveries_and_a_second_run_changes_nothing() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let stripe = StripeStandin::start().await;
    let venice = VeniceStandin::start(sample_citizens()).await;
    script(&stripe, SUBSCRIPTIONS);
    for seed in [7, 8, 9] {
        heal_dropped(&pg, &redis, &stripe, &venice, seed).await;
    }
}

async fn heal_dropped(
    pg: &PgServer,
    redis: &RedisServer,
    stripe: &StripeStandin,
    venice: &VeniceStandin,
    seed: u64,
) {
    let events = stripe.events();
    let truth = expected(stripe);
    let url = pg.fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_string();
    let env = |interval: &str| {
        let mut env = billing_env(url.clone(), redis, stripe, venice);
        env.push(("STRIPE_RECONCILE_INTERVAL", interval.to_string()));
        env
    };
    let webhooks = TestApp::start(&env("0")).await;
    let db = pg.client(&database).await;
    add_accounts(&db, SUBSCRIPTIONS).await;
    let plan = Delivery {
        seed,
        shuffle: true,
        duplicate: 0.2,
        drop: 0.05,
        concurrency: 4,
        ..Delivery::default()
    };
    let delivered = stripe
        .deliver(
            &format!("{}/webhooks/stripe", webhooks.base),
            SECRET,
            &events,
            plan,
        )
        .await;
    assert!(delivered.dropped.len() > 20, "{:?}", delivered.dropped);
    assert!(delivered.statuses.iter().all(|s| *s == 200));
    assert_ne!(
        actual(pg, &database).await,
        truth,
        "seed {seed}: the drops matter"
    );
    let recorded = || async {
        db.query_one(
            "SELECT count(*), (SELECT finished_at::text FROM cascade_stripe_reconcile) \
             FROM cascade_stripe_events",
            &[],
        )
        .await
        .map(|row| (row.get::<_, i64>(0), row.get::<_, Option<String>>(1)))
        .unwrap()
    };
    assert_eq!(
        recorded().await,
        ((events.len() - delivered.dropped.len()) as i64, None),
        "nothing reconciled yet"
    );

    let reconciler = TestApp::start(&env("300ms")).await;
    let mut first_run = None;
    for _ in 0..300 {
        let (count, finished) = recorded().await;
        if finished.is_some() {
            assert_eq!(count as usize, events.len(), "each event once");
            first_run = finished;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let first_run = first_run.expect("a reconciliation run within 30 s");
    let healed = actual(pg, &database).await;
    let wrong: Vec<_> = truth
        .iter()
        .filter(|(user, want)| healed.get(user) != Some(want))
        .map(|(user, want)| format!("{user}: want {want}, got {:?}", healed.get(user)))
        .collect();
    assert!(wrong.is_empty(), "seed {seed}: {wrong:#?}");
    let changed_at = || async {
        db.query_one(
            "SELECT (SELECT max(updated_at)::text FROM cascade_subscriptions), \
                    (SELECT max(updated_at)::text FROM cascade_users)",
            &[],
        )
        .await
        .map(|row| {
            (
                row.get::<_, Option<String>>(0),
                row.get::<_, Option<String>>(1),
            )
        })
        .unwrap()
    };
    let before = changed_at().await;
    let mut later_run = false;
    for _ in 0..300 {
        let (count, finished) = recorded().await;
        if finished.is_some_and(|at| at != first_run) {
            assert_eq!(count as usize, events.len());
            later_run = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(later_run, "a second run within 30 s");
    assert_eq!(
        changed_at().await,
        before,
        "seed {seed}: a second run changes nothing"
    );
    assert_eq!(actual(pg, &database).await, healed);
    drop(reconciler);
    drop(webhooks);
}

/// The stand-in's `GET /v1/events`, which reconciliation reads: the bearer key, newest first,
/// `created[gte]`, `types[]`, and pages that end with `has_more` false.
#[tokio::test]
async fn the_stand_in_lists_events_as_stripe_does() {
    let stripe = StripeStandin::start().await;
    script(&stripe, 5);
    let events = stripe.events();
    let list = |query: String, key: &'static str| {
        let url = format!("{}/v1/events?{query}", stripe.url());
        async move {
            let response = crate::support::http()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    assert_eq!(list("limit=3".into(), "sk_test_wrong").await.0, 401);
    let mut seen = Vec::new();
    let mut query = "limit=3".to_string();
    for _ in 0..100 {
        let (status, page) = list(query.clone(), cascade_testkit::stripe::TEST_KEY).await;
        assert_eq!(status, 200);
        let data = page["data"].as_array().unwrap();
        seen.extend(data.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        if page["has_more"] == false {
            break;
        }
        query = format!("limit=3&starting_after={}", seen.last().unwrap());
    }
    let newest_first: Vec<String> = events
        .iter()
        .rev()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, newest_first);
    let since = events[events.len() / 2]["created"].as_i64().unwrap();
    let (_, page) = list(
        format!("limit=100&created%5Bgte%5D={since}&types%5B%5D=invoice.paid"),
        cascade_testkit::stripe::TEST_KEY,
    )
    .await;
    let want: Vec<&serde_json::Value> = events
        .iter()
        .rev()
        .filter(|e| e["created"].as_i64().unwrap() >= since && e["type"] == "invoice.paid")
        .map(|e| &e["id"])
        .collect();
    let got: Vec<&serde_json::Value> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert!(
        !want.is_empty() && want.len() < events.len() / 2,
        "{want:?}"
    );
    assert_eq!(got, want);
}
