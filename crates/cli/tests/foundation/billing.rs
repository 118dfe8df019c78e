//! `cascade billing reconcile` and `cascade billing replay FILE` against a running
//! `cascade serve`, real PostgreSQL and Redis, and the test kit's Stripe stand-in.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cascade_testkit::stripe::{TEST_KEY, billing_state};
use cascade_testkit::{PgServer, RedisServer, StripeStandin};
use serde_json::{Value, json};

use crate::common::{Served, cascade, empty_dir, http, run_bounded};

const PRICES: &str = r#"{"explorer":"price_explorer","architect":"price_architect"}"#;

/// PostgreSQL, Redis, the stand-in, and `cascade serve` on them with Stripe configured (and
/// its own reconciliation off: the command is the only one to heal).
struct Billing {
    served: Served,
    env: Vec<(&'static str, String)>,
    database: String,
    stripe: StripeStandin,
    pg: PgServer,
    _redis: RedisServer,
}

impl Billing {
    async fn start() -> Billing {
        let pg = PgServer::start().await;
        let redis = RedisServer::start().await;
        let stripe = StripeStandin::start().await;
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        let env = vec![
            ("DATABASE_URL", url),
            ("REDIS_URL", redis.url()),
            ("JWT_SECRET", "billing-cli-tests-secret-0123456789ab".into()),
            ("VENICE_API_URL", "http://127.0.0.1:1".into()),
            ("STRIPE_API_URL", stripe.url()),
            ("STRIPE_API_KEY", TEST_KEY.into()),
            ("STRIPE_WEBHOOK_SECRET", "whsec_cli_tests".into()),
            ("STRIPE_PRICES_JSON", PRICES.into()),
            ("STRIPE_RECONCILE_INTERVAL", "0".into()),
        ];
        let served = Served::start(&env).await;
        Billing {
            served,
            env,
            database,
            stripe,
            pg,
            _redis: redis,
        }
    }

    /// `cascade billing ARGS` with the server's settings, run to completion.
    async fn billing(&self, args: &[&str], dir: &Path) -> Output {
        let mut command = cascade(dir);
        command.arg("billing").args(args);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        // Blocking, off the runtime: the stand-in answers the command meanwhile.
        tokio::task::spawn_blocking(move || run_bounded(command, Duration::from_secs(90)).0)
            .await
            .unwrap()
    }

    /// Registers `username` over HTTP: its id and access token.
    async fn register(&self, username: &str) -> (i64, String) {
        let base = &self.served.base;
        let body: Value = http()
            .post(format!("{base}/auth/register"))
            .json(&json!({"username": username, "password": "correct horse battery"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = body["access_token"].as_str().expect("a token").to_string();
        let me: Value = http()
            .get(format!("{base}/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (me["user"]["id"].as_i64().expect("an id"), token)
    }

    /// The server's `GET /billing/subscription` for `token`.
    async fn subscription(&self, token: &str) -> Value {
        http()
            .get(format!("{}/billing/subscription", self.served.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The account's tier, its subscriptions (`id:status:tier`) and the events recorded.
    async fn rows(&self, user: i64) -> (String, Vec<String>, i64) {
        billing_state(&self.pg.client(&self.database).await, user).await
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_reconcile_repairs_a_subscription_whose_webhooks_were_dropped() {
    let world = Billing::start().await;
    let (user, token) = world.register("dora").await;
    // Stripe has the subscription; none of its webhooks reached Cascade.
    let sub = world
        .stripe
        .create_subscription(None, user, "price_explorer");
    assert_eq!(world.subscription(&token).await["tier"], "observer");
    let dir = empty_dir();

    let out = world.billing(&["reconcile"], &dir).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for line in [
        format!("repaired {sub} (account {user}): unknown here -> active (explorer)\n"),
        format!("account {user}: tier observer -> explorer\n"),
    ] {
        assert!(stdout.contains(&line), "{line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("reconciled: 2 events listed, 2 applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("subscriptions repaired: 1, tiers changed: 1"),
        "{stdout}"
    );
    assert_eq!(
        world.rows(user).await,
        ("explorer".into(), vec![format!("{sub}:active:explorer")], 2)
    );
    // The running server sees it on the next request (its cached session was dropped).
    let body = world.subscription(&token).await;
    assert_eq!(
        (
            &body["tier"],
            &body["gate_tier"],
            &body["subscription"]["id"]
        ),
        (&json!("explorer"), &json!("explorer"), &json!(sub))
    );

    // A second pass finds nothing to repair.
    let out = world.billing(&["reconcile"], &dir).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        !stdout.lines().any(|l| l.starts_with("repaired ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 events listed, 0 applied (their webhooks were lost), 2 already applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("subscriptions repaired: 0, tiers changed: 0"),
        "{stdout}"
    );
    assert_eq!(world.rows(user).await.2, 2);
}

/// One event whose subscription Stripe will not give does not stop the run: the others are
/// applied and reported (the account's tier once, as its net change), the run exits 1 naming
/// it, and the next run retries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_reconcile_applies_the_rest_when_one_subscription_cannot_be_fetched() {
    let world = Billing::start().await;
    let (user, token) = world.register("fritz").await;
    let sub = world
        .stripe
        .create_subscription(None, user, "price_explorer"); // created, invoice.paid
    world.stripe.change_price(&sub, "price_architect"); // updated
    // An invoice of a subscription never seen here (in doubt), which Stripe fails to give.
    let stuck = world.stripe.record(
        "invoice.paid",
        json!({"id": "in_stuck", "object": "invoice", "customer": "cus_elsewhere",
               "subscription": "sub_stuck", "status": "paid"}),
    );
    world.stripe.break_subscription("sub_stuck", true);
    let dir = empty_dir();

    let out = world.billing(&["reconcile"], &dir).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let tier_lines: Vec<&str> = stdout.lines().filter(|l| l.contains(": tier ")).collect();
    assert_eq!(
        tier_lines,
        [format!("account {user}: tier observer -> architect")],
        "{stdout}"
    );
    for expected in [
        format!("repaired {sub} (account {user}): unknown here -> active (architect)\n"),
        format!(
            "not applied {}: its subscription could not be fetched from Stripe",
            stuck["id"].as_str().unwrap()
        ),
        "4 events listed, 3 applied (their webhooks were lost), 0 already applied, 0 older \
         than the state here, 0 failed, 1 not applied yet"
            .to_string(),
    ] {
        assert!(stdout.contains(&expected), "{expected:?} in:\n{stdout}");
    }
    assert_eq!(
        world.rows(user).await,
        (
            "architect".into(),
            vec![format!("{sub}:active:architect")],
            3
        )
    );
    assert_eq!(world.subscription(&token).await["gate_tier"], "architect");

    // Stripe answers again: the held cursor lists the event once more, and it is applied.
    world.stripe.break_subscription("sub_stuck", false);
    let out = world.billing(&["reconcile"], &dir).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("4 events listed, 1 applied (their webhooks were lost), 3 already applied"),
        "{stdout}"
    );
    assert!(stdout.contains("0 not applied yet"), "{stdout}");
    assert_eq!(world.rows(user).await.2, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_replay_applies_saved_events_once() {
    let world = Billing::start().await;
    let (user, token) = world.register("emil").await;
    let sub = world
        .stripe
        .create_subscription(None, user, "price_explorer"); // created, invoice.paid
    world.stripe.change_price(&sub, "price_architect"); // updated
    let events = world.stripe.events();
    // Saved as JSON lines: the update before the (older) invoice, and a type not handled.
    let unknown = json!({"id": "evt_customer", "object": "event", "type": "customer.created",
                         "created": 1, "data": {"object": {"id": "cus_x"}}});
    let saved: String = [&events[0], &events[2], &events[1], &unknown]
        .iter()
        .map(|e| format!("{e}\n"))
        .collect();
    let dir = empty_dir();
    std::fs::write(dir.join("events.jsonl"), saved).unwrap();
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();

    let out = world.billing(&["replay", "events.jsonl"], &dir).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for expected in [
        format!(
            "{} customer.subscription.created: applied (account {user}: tier observer -> explorer)",
            ids[0]
        ),
        format!(
            "{} customer.subscription.updated: applied (account {user}: tier explorer -> architect)",
            ids[2]
        ),
        format!("{} invoice.paid: ignored-older", ids[1]),
        "evt_customer customer.created: unknown-type".to_string(),
        "replayed 4 events: 2 applied, 0 duplicate, 1 ignored-older, 1 unknown-type, 0 failed"
            .to_string(),
    ] {
        assert!(stdout.contains(&expected), "{expected:?} in:\n{stdout}");
    }
    let after = (
        "architect".to_string(),
        vec![format!("{sub}:active:architect")],
        3,
    );
    assert_eq!(world.rows(user).await, after);
    assert_eq!(world.subscription(&token).await["gate_tier"], "architect");

    // Replayed again: every handled event is a duplicate, nothing changes.
    let out = world.billing(&["replay", "events.jsonl"], &dir).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(
            "replayed 4 events: 0 applied, 3 duplicate, 0 ignored-older, 1 unknown-type, 0 failed"
        ),
        "{stdout}"
    );
    assert_eq!(world.rows(user).await, after);
}

#[tokio::test]
async fn billing_commands_without_stripe_or_with_a_bad_file_exit_2_and_say_why() {
    let dir = empty_dir();
    std::fs::write(dir.join("bad.json"), "[{\"id\": \"evt_1\"}]").unwrap();
    // Nothing listens there: these exit before connecting to anything.
    let database = ("DATABASE_URL", "postgres://cascade@127.0.0.1:1/none");
    for args in [vec!["reconcile"], vec!["replay", "bad.json"]] {
        let mut command = cascade(&dir);
        command
            .arg("billing")
            .args(&args)
            .env(database.0, database.1);
        let (out, _) = run_bounded(command, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("billing is not configured: STRIPE_API_KEY is not set"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // No database named and no embedded one yet: an embedded PostgreSQL started for them
    // would be empty; they say so and start nothing.
    for args in [vec!["reconcile"], vec!["replay", "bad.json"]] {
        let mut command = cascade(&dir);
        command
            .arg("billing")
            .args(&args)
            .env("STRIPE_API_KEY", TEST_KEY);
        let (out, _) = run_bounded(command, Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr)
                .contains("billing commands need the server's database: set DATABASE_URL"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!dir.join(".cascade").exists(), "{args:?}");
    }
    let mut command = cascade(&dir);
    command
        .args(["billing", "replay", "bad.json"])
        .env(database.0, database.1)
        .env("STRIPE_API_KEY", TEST_KEY);
    let (out, _) = run_bounded(command, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.json: event 1: not a Stripe event"),
        "{}",
        text(&out.stderr)
    );
}
