//! A catalog under test: PostgreSQL, Redis and one or more servers, with request helpers.

use cascade_testkit::{PgServer, RedisServer};
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{Served, http};

pub struct Catalog {
    pub pg: PgServer,
    pub database: String,
    _redis: RedisServer,
    pub servers: Vec<Served>,
}

impl Catalog {
    /// `instances` servers sharing one fresh database and one Redis.
    pub async fn start(instances: usize) -> Catalog {
        Self::start_with(instances, &[]).await
    }

    pub async fn start_with(instances: usize, extra: &[(&str, String)]) -> Catalog {
        let pg = PgServer::start().await;
        let redis = RedisServer::start().await;
        let url = pg.fresh_database().await;
        let database = url.rsplit('/').next().unwrap_or_default().to_string();
        let mut env = vec![("DATABASE_URL", url), ("REDIS_URL", redis.url())];
        env.extend(extra.iter().cloned());
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(Served::start(&env).await);
        }
        Catalog {
            pg,
            database,
            _redis: redis,
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

/// Sends a request; returns the status and the JSON body (`Null` when empty).
pub async fn send(base: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = http().request(method, format!("{base}{path}"));
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
