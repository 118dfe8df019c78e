//! The application under test for billing: PostgreSQL, Redis, the Stripe and Venice stand-ins
//! and one or more instances of the real application sharing them.

use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::stripe::{
    Delivered, Delivery, TEST_KEY, billing_state, signature_header, unix_now,
};
use cascade_testkit::venice::sample_citizens;
use cascade_testkit::{PgServer, RedisServer, StripeStandin, VeniceStandin};
use serde_json::{Value, json};

pub const SECRET: &str = "whsec_cascade_test_secret";
pub const PRICES: &str = r#"{"explorer":"price_explorer","architect":"price_architect"}"#;

/// Fields drop in declaration order: the servers stop before what they use.
#[allow(dead_code)]
pub struct World {
    pub servers: Vec<TestApp>,
    pub database: String,
    pub stripe: StripeStandin,
    pub venice: VeniceStandin,
    pub pg: PgServer,
    pub redis: RedisServer,
}

/// The settings of a billing-enabled instance on `pg`'s database `url`.
pub fn billing_env(
    url: String,
    redis: &RedisServer,
    stripe: &StripeStandin,
    venice: &VeniceStandin,
) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", url),
        ("REDIS_URL", redis.url()),
        (
            "JWT_SECRET",
            "billing-tests-secret-billing-tests-0123".to_string(),
        ),
        ("RATE_LIMIT_API", "off".to_string()),
        ("VENICE_API_URL", venice.url()),
        ("STRIPE_API_URL", stripe.url()),
        ("STRIPE_API_KEY", TEST_KEY.to_string()),
        ("STRIPE_WEBHOOK_SECRET", SECRET.to_string()),
        ("STRIPE_PRICES_JSON", PRICES.to_string()),
    ]
}

#[allow(dead_code)]
impl World {
    /// `instances` instances of the application with Stripe configured, then `extra` (which
    /// replaces a variable of the same name).
    pub async fn start(instances: usize, extra: &[(&'static str, String)]) -> World {
        let pg = PgServer::start().await;
        let redis = RedisServer::start().await;
        let stripe = StripeStandin::start().await;
        let venice = VeniceStandin::start(sample_citizens()).await;
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        let mut env = billing_env(url, &redis, &stripe, &venice);
        for (var, value) in extra {
            env.retain(|(v, _)| v != var);
            env.push((var, value.clone()));
        }
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(TestApp::start(&env).await);
        }
        World {
            servers,
            database,
            stripe,
            venice,
            pg,
            redis,
        }
    }

    pub fn url(&self, instance: usize, path: &str) -> String {
        format!("{}{path}", self.servers[instance].base)
    }

    pub fn webhook(&self, instance: usize) -> String {
        self.url(instance, "/webhooks/stripe")
    }

    /// Registers an account: its id and access token.
    pub async fn register(&self, username: &str) -> (i64, String) {
        let response = http()
            .post(self.url(0, "/auth/register"))
            .json(&json!({"username": username, "password": "correct horse battery"}))
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), 201, "registering {username}");
        let body: Value = response.json().await.unwrap();
        let token = body["access_token"].as_str().expect("a token").to_string();
        let me: Value = http()
            .get(self.url(0, "/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (me["user"]["id"].as_i64().expect("an id"), token)
    }

    /// `GET /billing/subscription` on `instance` as `token`.
    pub async fn subscription(&self, instance: usize, token: &str) -> reqwest::Response {
        http()
            .get(self.url(instance, "/billing/subscription"))
            .bearer_auth(token)
            .send()
            .await
            .expect("the server answers")
    }

    /// One delivery of `body` to instance 0 with `header` as `Stripe-Signature` (none: left
    /// out): the status and the body.
    pub async fn post_raw(&self, body: &str, header: Option<String>) -> (u16, Value) {
        let mut request = http()
            .post(self.webhook(0))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(header) = header {
            request = request.header("stripe-signature", header);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `body` signed with `SECRET` now, to instance 0.
    pub async fn post_signed(&self, body: &str) -> (u16, Value) {
        let header = signature_header(&[SECRET], unix_now(), body.as_bytes());
        self.post_raw(body, Some(header)).await
    }

    /// Every event the stand-in recorded, in order, to instance 0.
    pub async fn deliver_all(&self) -> Delivered {
        let events = self.stripe.events();
        self.stripe
            .deliver(&self.webhook(0), SECRET, &events, Delivery::default())
            .await
    }

    /// What billing wrote: the account's tier and status, its subscriptions
    /// (`id:status:tier`), and the number of events recorded.
    pub async fn state_of(&self, user_id: i64) -> (String, Vec<String>, i64) {
        billing_state(&self.pg.client(&self.database).await, user_id).await
    }

    /// The value of `cascade_stripe_webhooks_total` with these labels on instance 0 (0 if
    /// absent).
    pub async fn webhook_metric(&self, labels: &str) -> u64 {
        let text = http()
            .get(self.url(0, "/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted = text.contains("cascade_stripe_webhooks_total{");
        assert!(
            !counted || text.contains("# HELP cascade_stripe_webhooks_total "),
            "the counter has its help text"
        );
        text.lines()
            .filter(|l| l.starts_with("cascade_stripe_webhooks_total{"))
            .filter(|l| labels.split(',').all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }
}

pub fn http() -> reqwest::Client {
    cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))
        .expect("client")
}
