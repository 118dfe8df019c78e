//! Servers sharing one fresh database and one Redis (none in unified mode), accounts on
//! them, and requests.

use std::time::Duration;

use cascade_server::testing::TestApp;
use cascade_testkit::{PgServer, RedisServer};
use reqwest::Method;
use serde_json::{Value, json};

/// Fields drop in declaration order: the servers stop before the PostgreSQL and Redis they use.
pub struct Cluster {
    pub servers: Vec<TestApp>,
    pub pg: PgServer,
    pub database: String,
    url: String,
    /// The servers' Redis; `None` in unified mode (`CACHE_BACKEND=postgres`).
    redis: Option<RedisServer>,
}

/// The setting that runs a cluster in unified mode: PostgreSQL alone, no Redis started.
pub const UNIFIED: (&str, &str) = ("CACHE_BACKEND", "postgres");

/// The operators' token of every server (`/audit/all`).
pub const ADMIN_TOKEN: &str = "agents-tests-admin-token-0123456789abcdef";

/// Every server signs with it, so a token from one is good on the others.
const JWT_SECRET: &str = "agents-tests-secret-agents-tests-secret";

impl Cluster {
    pub async fn start(instances: usize) -> Cluster {
        Cluster::start_with(instances, &[]).await
    }

    /// `instances` servers with the settings `extra` on top of the common ones; with
    /// [`UNIFIED`] among them, no Redis.
    pub async fn start_with(instances: usize, extra: &[(&str, &str)]) -> Cluster {
        let pg = PgServer::start().await;
        let redis = if extra.contains(&UNIFIED) {
            None
        } else {
            Some(RedisServer::start().await)
        };
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap_or_default().to_string();
        let mut cluster = Cluster {
            servers: Vec::new(),
            pg,
            database,
            url,
            redis,
        };
        for _ in 0..instances {
            cluster.add_server(extra).await;
        }
        cluster
    }

    /// One more server on the same database and Redis (if any), with `extra` settings.
    pub async fn add_server(&mut self, extra: &[(&str, &str)]) {
        let mut env = vec![
            ("DATABASE_URL", self.url.clone()),
            ("JWT_SECRET", JWT_SECRET.to_string()),
            ("RATE_LIMIT_API", "off".to_string()),
            ("AGENTS_BULK_MAX", "5".to_string()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ];
        env.extend(self.redis.as_ref().map(|r| ("REDIS_URL", r.url())));
        // Under CASCADE_TEST_POOLER=pgbouncer: LISTEN and migrations bypass PgBouncer.
        env.extend(cascade_testkit::direct_url(&self.url).map(|d| ("DATABASE_DIRECT_URL", d)));
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        self.servers.push(TestApp::start(&env).await);
    }

    pub fn base(&self, instance: usize) -> &str {
        &self.servers[instance].base
    }

    /// A client straight to the database, as the module's own role.
    pub async fn sql(&self) -> tokio_postgres::Client {
        self.pg.client(&self.database).await
    }

    /// A row count straight from PostgreSQL.
    pub async fn count(&self, sql: &str) -> i64 {
        self.sql().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Registers `username` on the first server; returns a client acting as it.
    pub async fn user(&self, username: &str) -> User {
        let (status, body) = request(
            self.base(0),
            None,
            Method::POST,
            "/auth/register",
            Some(json!({"username": username, "password": format!("{username}'s password")})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        User {
            token: body["access_token"].as_str().unwrap().to_string(),
            id: body["user"]["id"].as_i64().expect("the account's id"),
        }
    }
}

/// An account's token.
pub struct User {
    pub token: String,
    pub id: i64,
}

impl User {
    pub async fn send(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        request(base, Some(&self.token), method, path, body).await
    }

    pub async fn get(&self, base: &str, path: &str) -> (u16, Value) {
        self.send(base, Method::GET, path, None).await
    }

    /// Creates an agent; returns it.
    pub async fn agent(&self, base: &str, body: Value) -> Value {
        let (status, agent) = self.send(base, Method::POST, "/agents", Some(body)).await;
        assert_eq!(status, 201, "{agent}");
        agent
    }
}

/// Sends a request with `token` (or none); returns the status and the JSON body (`Null` when
/// empty).
pub async fn request(
    base: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
            .expect("client");
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts a 400 in the JSON error shape whose error names `field`.
pub fn assert_bad_field(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(body["error"]["field"], field, "{body}");
}
