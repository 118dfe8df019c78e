//! The suite's own HTTP client: registration, the warm-up, the stampede and outage scenarios'
//! requests, and the server's counters (`/metrics`, `/health/db`) read around each scenario.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The `ADMIN_TOKEN` the suite's server is started with: `/health/db` answers only it.
pub const ADMIN_TOKEN: &str = "cascade-bench-admin-token-0123456789abcdef";

/// A cheap-to-clone client of the server under test; every request has the deadline of the
/// underlying `reqwest` client (2 s to connect, 30 s in all).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// The bench account's access token, which writes carry (the seeded producers are its).
    pub token: String,
}

impl Client {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http =
            cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))?;
        Ok(Client {
            http,
            base: base.to_string(),
            token: String::new(),
        })
    }

    /// Registers the account; its token authorises the suite's writes from then on.
    pub async fn register(&mut self, username: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/auth/register", self.base))
            .json(&json!({ "username": username, "password": "bench password, not secret" }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("registering {username}: {status}: {body}");
        }
        self.token = body["access_token"]
            .as_str()
            .context("no access_token in the registration answer")?
            .to_string();
        Ok(())
    }

    /// The body of a successful `GET`; any other status is an error.
    pub async fn get_ok(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let response = self.http.get(format!("{}{path}", self.base)).send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body.to_vec())
    }

    /// A `PATCH` as the bench account; any status but a success is an error.
    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<()> {
        match self.patch_status(path, body).await {
            Some(status) if (200..300).contains(&status) => Ok(()),
            Some(status) => bail!("PATCH {path}: {status}"),
            None => bail!("PATCH {path}: no answer"),
        }
    }

    /// The status of a `PATCH`, or `None` when no answer came.
    pub async fn patch_status(&self, path: &str, body: &Value) -> Option<u16> {
        let response = self
            .http
            .patch(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    /// Drops the asset from every cache tier, exactly as a user's write would.
    pub async fn invalidate_asset(&self, id: &str) -> anyhow::Result<()> {
        self.patch(
            &format!("/listings/{id}"),
            &json!({ "metadata": { "stampede": true } }),
        )
        .await
    }

    /// The value of an unlabelled series of `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = String::from_utf8(self.get_ok("/metrics").await?)?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// The cache counters of `namespace` from `/health/db` (`{}` when it has none yet).
    pub async fn cache_stats(&self, namespace: &str) -> anyhow::Result<Value> {
        let body = self.health_db().await?;
        Ok(body["cache"]["namespaces"]
            .as_array()
            .and_then(|all| all.iter().find(|ns| ns["namespace"] == namespace))
            .cloned()
            .unwrap_or_else(|| json!({})))
    }

    /// `/health/db`, as the operator reads it (with [`ADMIN_TOKEN`]).
    pub async fn health_db(&self) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}/health/db", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "GET /health/db: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// One counter of [`cache_stats`](Self::cache_stats) (0 when absent).
    pub async fn cache_counter(&self, namespace: &str, field: &str) -> anyhow::Result<u64> {
        Ok(self.cache_stats(namespace).await?[field]
            .as_u64()
            .unwrap_or(0))
    }
}
