//! The CASCADE application (seeds 000, 001, 004): users linked to Venice citizens,
//! consciousness sessions and patterns, collaboration spaces, the ducat/USD bridge, Stripe
//! billing, real-time channels.
//!
//! What is here today: its settings and cache namespaces ([`config`]), registered with the
//! platform so that `cascade --help`, `cascade config` and `CACHE_TTLS_JSON` know them, and
//! the Venice reachability probe of `cascade check` ([`probe_venice`]). Its tables, routes and
//! tasks arrive with the issues that build them, in this crate, the way `crates/catalog` has
//! its own.

pub mod config;

use std::time::{Duration, Instant};

use axum::Router;
use cascade_http::{AppState, Module};

pub use config::{AppConfig, RawAppConfig};

/// The module as the server composes it.
pub struct AppModule {
    pub config: AppConfig,
}

impl Module for AppModule {
    fn name(&self) -> &'static str {
        "app"
    }

    fn router(&self, _state: &AppState) -> Router {
        Router::new()
    }
}

/// `GET {VENICE_API_URL}` under `deadline`: `Ok` with what answered, `Err` with why not.
pub async fn probe_venice(config: &AppConfig, deadline: Duration) -> Result<String, String> {
    let client = cascade_core::upstream::http_client(deadline, deadline)
        .map_err(|err| cascade_core::db::error_chain(&err))?;
    let url = &config.venice.url;
    let started = Instant::now();
    let mut request = client.get(url);
    if let Some(key) = &config.venice.api_key {
        request = request.bearer_auth(key.expose());
    }
    match cascade_core::upstream::send("venice", request).await {
        Ok(response) => Ok(format!(
            "{url} answered HTTP {} in {} ms",
            response.status().as_u16(),
            started.elapsed().as_millis()
        )),
        Err(err) => Err(format!("{url}: {}", cascade_core::db::error_chain(&err))),
    }
}
