//! Spaces under test: PostgreSQL, Redis and one or more instances of the real application
//! sharing them, with request helpers. Accounts are registered over HTTP; their tiers are set
//! in SQL (billing is another issue's).

use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::venice::sample_citizens;
use cascade_testkit::{PgServer, RedisServer, VeniceStandin};
use reqwest::Method;
use serde_json::{Value, json};

/// Fields drop in declaration order: the servers stop before what they use.
#[allow(dead_code)]
pub struct World {
    pub servers: Vec<TestApp>,
    pub database: String,
    pub venice: VeniceStandin,
    pub pg: PgServer,
    pub redis: RedisServer,
}

/// Every instance signs tokens with it, so a token from one is good on the others.
const JWT_SECRET: &str = "spaces-tests-secret-spaces-tests-secret";

/// An account: its access token.
#[derive(Clone)]
pub struct User {
    pub token: String,
}

impl World {
    /// `instances` servers on one fresh database and one Redis, with `extra` settings.
    pub async fn start(instances: usize, extra: &[(&str, String)]) -> World {
        let pg = PgServer::start().await;
        let redis = RedisServer::start().await;
        let venice = VeniceStandin::start(sample_citizens()).await;
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap().to_string();
        // Under CASCADE_TEST_POOLER=pgbouncer: LISTEN and migrations bypass PgBouncer.
        let direct = cascade_testkit::direct_url(&url);
        let mut env = vec![
            ("DATABASE_URL", url),
            ("REDIS_URL", redis.url()),
            ("JWT_SECRET", JWT_SECRET.to_string()),
            ("RATE_LIMIT_API", "off".to_string()),
            ("RATE_LIMIT_AUTH", "off".to_string()),
            ("VENICE_API_URL", venice.url()),
        ];
        env.extend(direct.map(|d| ("DATABASE_DIRECT_URL", d)));
        env.extend(extra.iter().cloned());
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(TestApp::start(&env).await);
        }
        World {
            servers,
            database,
            venice,
            pg,
            redis,
        }
    }

    /// Instance `n`'s base URL (modulo the number of instances).
    pub fn base(&self, n: usize) -> &str {
        &self.servers[n % self.servers.len()].base
    }

    /// Registers `name` on instance 0.
    pub async fn register(&self, name: &str) -> User {
        let (status, body) = send(
            self.base(0),
            Method::POST,
            "/auth/register",
            None,
            Some(json!({"username": name, "password": "correct horse battery"})),
        )
        .await;
        assert_eq!(status, 201, "registering {name}: {body}");
        User {
            token: body["access_token"].as_str().unwrap().to_string(),
        }
    }

    /// Registers `name` with a paid tier (set in SQL).
    pub async fn paid(&self, name: &str) -> User {
        let user = self.register(name).await;
        self.set_tier(name, "participant").await;
        user
    }

    pub async fn set_tier(&self, name: &str, tier: &str) {
        let n = self
            .sql()
            .await
            .execute(
                "UPDATE cascade_users SET subscription_tier = $2 WHERE username = $1",
                &[&name, &tier],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    /// A client on the application's database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        self.pg.client(&self.database).await
    }

    /// One number from PostgreSQL.
    pub async fn count(&self, query: &str) -> i64 {
        self.sql().await.query_one(query, &[]).await.unwrap().get(0)
    }

    /// `POST /spaces` as `user` on instance 0; asserts 201.
    pub async fn space(&self, user: &User, id: &str, max: i64, threshold: &str) -> Value {
        let (status, body) = self
            .call(
                0,
                Method::POST,
                "/spaces",
                Some(user),
                Some(json!({"space_id": id, "title": format!("Space {id}"),
                            "max_participants": max, "consciousness_threshold": threshold})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// `POST /consciousness/sessions` as `user`; asserts 201 and returns the session.
    pub async fn session(&self, user: &User, level: &str, space: Option<&str>) -> Value {
        let mut body = json!({ "consciousness_level": level });
        if let Some(space) = space {
            body["space_id"] = json!(space);
        }
        let (status, session) = self
            .call(
                0,
                Method::POST,
                "/consciousness/sessions",
                Some(user),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{session}");
        session
    }

    /// A request to instance `n`.
    pub async fn call(
        &self,
        n: usize,
        method: Method,
        path: &str,
        user: Option<&User>,
        body: Option<Value>,
    ) -> (u16, Value) {
        send(
            self.base(n),
            method,
            path,
            user.map(|u| u.token.as_str()),
            body,
        )
        .await
    }

    /// `GET path` on instance `n`, anonymously; asserts 200.
    pub async fn read(&self, n: usize, path: &str) -> Value {
        let (status, body) = self.call(n, Method::GET, path, None, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

pub fn http() -> reqwest::Client {
    cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))
        .expect("client")
}

/// Sends a request; the status and the JSON body (`null` when empty). Every non-empty answer
/// must be JSON, errors included.
pub async fn send(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http().request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("a body");
    if bytes.is_empty() {
        return (status, Value::Null);
    }
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

/// Sends raw text with a content type, for bodies `json!` cannot spell.
pub async fn send_raw(
    base: &str,
    path: &str,
    token: &str,
    content_type: &str,
    body: String,
) -> (u16, Value) {
    let response = http()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

/// The error code of a JSON error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("the JSON error shape: {body}"))
}

/// The error message of a JSON error body.
pub fn message(body: &Value) -> &str {
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("the JSON error shape: {body}"))
}
