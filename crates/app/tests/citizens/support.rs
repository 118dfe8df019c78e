//! The application under test: PostgreSQL, Redis, the Venice stand-in and one server (the
//! real application in-process), with request helpers.

use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::venice::sample_citizens;
use cascade_testkit::{PgServer, RedisServer, VeniceStandin};

/// Fields drop in declaration order: the server stops before what it uses. `pg` and `redis`
/// are held so their servers live as long as the test.
#[allow(dead_code)]
pub struct World {
    pub server: TestApp,
    /// The name of the application's database on `pg`.
    pub database: String,
    pub venice: VeniceStandin,
    pub pg: PgServer,
    pub redis: RedisServer,
}

impl World {
    /// The application with Venice played by the stand-in (its sample citizens), plus `extra`.
    pub async fn start(extra: &[(&str, String)]) -> World {
        let pg = PgServer::start().await;
        let redis = RedisServer::start().await;
        let venice = VeniceStandin::start(sample_citizens()).await;
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        let mut env = vec![
            ("DATABASE_URL", url),
            ("REDIS_URL", redis.url()),
            (
                "JWT_SECRET",
                "app-tests-secret-app-tests-secret-0123".to_string(),
            ),
            ("RATE_LIMIT_API", "off".to_string()),
            ("VENICE_API_URL", venice.url()),
        ];
        env.extend(extra.iter().cloned());
        let server = TestApp::start(&env).await;
        World {
            server,
            database,
            venice,
            pg,
            redis,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    /// `GET /citizens/{username}` (the username as given, not encoded).
    pub async fn citizen(&self, username: &str) -> reqwest::Response {
        http()
            .get(self.url(&format!("/citizens/{username}")))
            .send()
            .await
            .expect("the server answers")
    }
}

/// Helpers some of the test binaries sharing this file do not use.
#[allow(dead_code)]
impl World {
    /// Registers an account; its access token.
    pub async fn register(&self, username: &str) -> String {
        let response = http()
            .post(self.url("/auth/register"))
            .json(&serde_json::json!({"username": username, "password": "correct horse battery"}))
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), 201, "registering {username}");
        let body: serde_json::Value = response.json().await.unwrap();
        body["access_token"].as_str().expect("a token").to_string()
    }

    /// The `/metrics` exposition text.
    pub async fn metrics(&self) -> String {
        http()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("the server answers")
            .text()
            .await
            .expect("a text body")
    }

    /// `POST /me/citizen` with `body` as the JSON text, as `token` (none: anonymous).
    pub async fn link(&self, token: Option<&str>, body: String) -> reqwest::Response {
        let mut request = http()
            .post(self.url("/me/citizen"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the server answers")
    }

    /// `POST /me/citizen {"venice_username": username}` as `token`.
    pub async fn link_citizen(&self, token: &str, username: &str) -> reqwest::Response {
        let body = serde_json::json!({ "venice_username": username }).to_string();
        self.link(Some(token), body).await
    }

    /// `DELETE /me/citizen` as `token` (none: anonymous).
    pub async fn unlink(&self, token: Option<&str>) -> reqwest::Response {
        let mut request = http().delete(self.url("/me/citizen"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the server answers")
    }

    /// `GET /me` as `token`: its `user`.
    pub async fn me(&self, token: &str) -> serde_json::Value {
        let response = http()
            .get(self.url("/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        body["user"].clone()
    }

    /// The account row of `username` as `venice_username|venice_linked_at set|updated_at`
    /// (`-` for NULL): what a refused request must leave unchanged.
    pub async fn account_row(&self, username: &str) -> String {
        self.pg
            .client(&self.database)
            .await
            .query_one(
                "SELECT format('%s|%s|%s', coalesce(venice_username, '-'), \
                        venice_linked_at IS NOT NULL, updated_at) \
                 FROM cascade_users WHERE username = $1",
                &[&username],
            )
            .await
            .unwrap()
            .get(0)
    }
}

pub fn http() -> reqwest::Client {
    cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))
        .expect("client")
}
