//! A catalog under test: PostgreSQL, Redis and one or more servers, with request helpers.
//!
//! Catalog writes need an account that owns the producer. Each catalog registers one, the
//! publisher, and [`send`] makes writes to its servers as that account; [`send_as`] chooses
//! the token (or none), for the tests of who may write what.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cascade_testkit::{PgServer, RedisServer};
use reqwest::Method;
use serde_json::{Value, json};

use cascade_server::testing::TestApp;

/// An HTTP client with deadlines, as the platform's upstream client is built.
pub fn http() -> reqwest::Client {
    cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
        .expect("client")
}

/// Fields drop in declaration order: the servers stop before the PostgreSQL and Redis they use.
pub struct Catalog {
    pub servers: Vec<TestApp>,
    pub pg: PgServer,
    pub database: String,
    pub redis: RedisServer,
}

/// The secret every catalog server signs with, so a token from one is good on the others.
const JWT_SECRET: &str = "catalog-tests-secret-catalog-tests-secret";

/// The `ADMIN_TOKEN` of every catalog server: what reads `/health/db`.
pub const ADMIN_TOKEN: &str = "catalog-tests-admin-token-0123456789";

/// The publisher token of each catalog server, by base URL: what [`send`] writes with.
static PUBLISHERS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// The publisher's token on `base`.
pub fn publisher_token(base: &str) -> Option<String> {
    PUBLISHERS.lock().unwrap().as_ref()?.get(base).cloned()
}

impl Catalog {
    /// `instances` servers sharing one fresh database and one Redis.
    pub async fn start(instances: usize) -> Catalog {
        Self::start_with(instances, &[]).await
    }

    pub async fn start_with(instances: usize, extra: &[(&str, String)]) -> Catalog {
        let pg = PgServer::start().await;
        let url = pg.fresh_database().await;
        Self::start_on(pg, url, instances, extra).await
    }

    /// `instances` servers on database `url` of `pg` (made by the caller: a replica's URL in
    /// `extra` names it too) and a fresh Redis.
    pub async fn start_on(
        pg: PgServer,
        url: String,
        instances: usize,
        extra: &[(&str, String)],
    ) -> Catalog {
        let redis = RedisServer::start().await;
        let database = url.rsplit('/').next().unwrap_or_default().to_string();
        let direct = cascade_testkit::direct_url(&url);
        let mut env = vec![
            ("DATABASE_URL", url),
            ("REDIS_URL", redis.url()),
            ("JWT_SECRET", JWT_SECRET.to_string()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("RATE_LIMIT_API", "off".to_string()),
        ];
        // Under CASCADE_TEST_POOLER=pgbouncer the URL goes through PgBouncer: LISTEN and
        // migrations take the direct one, as a deployment's DATABASE_DIRECT_URL.
        let through_pgbouncer = direct.is_some();
        env.extend(direct.map(|d| ("DATABASE_DIRECT_URL", d)));
        env.extend(extra.iter().cloned());
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(TestApp::start(&env).await);
        }
        if through_pgbouncer {
            let health = http()
                .get(format!("{}/health/db", servers[0].base))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("/health/db")
                .text()
                .await
                .expect("/health/db body");
            assert!(
                health.contains(r#""pooler":"pgbouncer""#),
                "PgBouncer was not detected: {health}"
            );
        }
        let token = register(&servers[0].base, "publisher").await;
        let mut publishers = PUBLISHERS.lock().unwrap();
        let publishers = publishers.get_or_insert_with(HashMap::new);
        for server in &servers {
            publishers.insert(server.base.clone(), token.clone());
        }
        Catalog {
            pg,
            database,
            redis,
            servers,
        }
    }

    pub fn base(&self) -> &str {
        &self.servers[0].base
    }

    /// A row count straight from PostgreSQL.
    pub async fn count(&self, table: &str) -> i64 {
        let client = self.pg.client(&self.database).await;
        client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The Redis keys matching `pattern`, sorted (read with `redis-cli --scan`).
    pub fn redis_keys(&self, pattern: &str) -> Vec<String> {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &self.redis.port().to_string(),
                "--scan",
                "--pattern",
                pattern,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("redis-cli (installed with redis-server)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    pub async fn producer(&self, id: &str) {
        let (status, body) = send(
            self.base(),
            Method::POST,
            "/producers",
            Some(json!({"producerId": id, "name": format!("Producer {id}")})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }

    pub async fn asset(&self, version: &str, producer: &str, name: &str) {
        let (status, body) = send(
            self.base(),
            Method::POST,
            "/assets",
            Some(
                json!({"versionId": version, "producerId": producer, "name": name,
                        "metadata": {"description": format!("about {name}")}}),
            ),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Records an OpenLineage COMPLETE event: `inputs` → `outputs`.
    pub async fn lineage(&self, inputs: &[&str], outputs: &[&str]) -> Value {
        let (status, body) = send(
            self.base(),
            Method::POST,
            "/lineage",
            Some(run_event(inputs, outputs)),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// A valid receipt and policy for `version`.
    pub async fn entitle(&self, version: &str) {
        for (path, body) in [
            (
                "/receipts",
                json!({"versionId": version, "payer": "alice", "amount": 100}),
            ),
            (
                "/policies",
                json!({"versionId": version, "document": {"license": "CC-BY-4.0"}}),
            ),
        ] {
            let (status, answer) = send(self.base(), Method::POST, path, Some(body)).await;
            assert_eq!(status, 201, "{path}: {answer}");
        }
    }
}

pub fn run_event(inputs: &[&str], outputs: &[&str]) -> Value {
    let datasets = |names: &[&str]| -> Value {
        names
            .iter()
            .map(|n| json!({"namespace": "s3://lake", "name": n}))
            .collect()
    };
    json!({
        "eventType": "COMPLETE",
        "eventTime": "2025-01-31T12:00:00.000Z",
        "producer": "https://github.com/OpenLineage/OpenLineage/tree/1.0.0/integration/spark",
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
        "run": {"runId": "3f5e2a7c-1b2d-4c3e-8f9a-0b1c2d3e4f50"},
        "job": {"namespace": "etl", "name": "nightly"},
        "inputs": datasets(inputs),
        "outputs": datasets(outputs),
    })
}

/// Registers an account on `base`; returns its access token.
pub async fn register(base: &str, username: &str) -> String {
    let (status, body) = send_as(
        base,
        None,
        Method::POST,
        "/auth/register",
        Some(json!({"username": username, "password": format!("{username}'s password")})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

/// Sends a request (a write as the catalog's publisher); returns the status and the JSON body
/// (`Null` when empty).
pub async fn send(base: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let token = (method != Method::GET)
        .then(|| publisher_token(base))
        .flatten();
    send_as(base, token.as_deref(), method, path, body).await
}

/// [`send`] with the bearer token `token`, or none.
pub async fn send_as(
    base: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http().request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

pub async fn get(base: &str, path: &str) -> (u16, Value) {
    send(base, Method::GET, path, None).await
}

/// Asserts a 400 whose error names `field`.
pub fn assert_bad_field(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(body["error"]["field"], field, "{body}");
}

/// `(versionId, entry[field])` of each ancestor in a bundle, in the bundle's order.
pub fn ancestors(bundle: &Value, field: &str) -> Vec<(String, Value)> {
    bundle["ancestors"]
        .as_array()
        .expect("ancestors")
        .iter()
        .map(|a| {
            (
                a["versionId"].as_str().unwrap().to_string(),
                a.pointer(field).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}
