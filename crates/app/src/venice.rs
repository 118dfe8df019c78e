//! Venice, the truth source of citizens (seeds 000 and 001): its connector, the citizen
//! username as Cascade accepts it, and the cache keys of its answers.
//!
//! Keys follow seed 001's `cascade:venice:{endpoint}:{params}`: the engine adds the prefix
//! (`cascade:`) and the namespace (`venice:`); this module names the endpoint and the
//! parameters, e.g. `get-ledger:Foscari_Banker`.

use std::time::Duration;

use cascade_core::cache::Cache;
use cascade_core::upstream::{Connector, Fetched, UpstreamError, UpstreamSettings};
use cascade_http::ApiError;

use crate::config::{AppConfig, VENICE, VENICE_LAST_GOOD};

/// The upstream's name in metrics, logs and errors.
pub const UPSTREAM: &str = "venice";

/// The longest username accepted (seed 000's `venice_username VARCHAR(100)`).
pub const USERNAME_MAX: usize = 100;

/// The pattern a citizen username matches (the OpenAPI document says the same).
pub const USERNAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$";

/// A Venice citizen username: 1 to 100 ASCII letters, digits, `_`, `.` or `-`, starting
/// with a letter or digit. Venice's names (`Italia`, `Foscari_Banker`, `sea_trader`) are
/// so; anything else (control characters, spaces, slashes, 10 KB strings) is refused before
/// it reaches a cache key or a Venice URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeniceUsername(String);

impl VeniceUsername {
    pub fn parse(field: &'static str, text: &str) -> Result<VeniceUsername, ApiError> {
        let bytes = text.as_bytes();
        if bytes.is_empty() || bytes.len() > USERNAME_MAX {
            return Err(ApiError::bad_request(
                field,
                format!("{field} must be 1 to {USERNAME_MAX} characters"),
            ));
        }
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
        if !bytes[0].is_ascii_alphanumeric() || !bytes.iter().all(allowed) {
            return Err(ApiError::bad_request(
                field,
                format!(
                    "{field} may hold only ASCII letters, digits, '_', '.' and '-', and starts with a letter or digit"
                ),
            ));
        }
        Ok(VeniceUsername(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The Venice connector, as the application's settings describe it.
pub fn connector(config: &AppConfig, cache: Cache) -> reqwest::Result<Connector> {
    let client = &config.venice_client;
    Connector::new(
        UpstreamSettings {
            name: UPSTREAM,
            base_url: config.venice.url.clone(),
            api_key: config.venice.api_key.clone(),
            connect_timeout: client.connect_timeout,
            request_timeout: client.request_timeout,
            pool_size: client.pool_size,
            retries: client.retries,
            breaker_threshold: client.breaker_threshold,
            breaker_cool_down: client.breaker_cool_down,
            namespace: VENICE,
            last_good_namespace: VENICE_LAST_GOOD,
            stale_if_error: client.stale_if_error,
        },
        cache,
    )
}

/// A citizen's ledger (`GET {VENICE_API_URL}/get-ledger?citizenUsername=`), through the
/// cache; `Ok(None)`: Venice knows no such citizen.
pub async fn ledger(
    venice: &Connector,
    username: &VeniceUsername,
) -> Result<Option<Fetched>, ApiError> {
    let key = format!("get-ledger:{}", username.as_str());
    venice
        .get_json(
            &key,
            "/get-ledger",
            &[("citizenUsername", username.as_str())],
        )
        .await
        .map_err(unavailable)
}

/// Venice failed and no copy within the stale bound exists: a 503 naming Venice.
pub fn unavailable(err: UpstreamError) -> ApiError {
    match err {
        UpstreamError::Unavailable { retry_after, .. } => ApiError::Unavailable {
            message: err.to_string(),
            retry_after,
        },
    }
}

/// `GET {VENICE_API_URL}/health` once at startup: logged, never blocking or failing it.
pub async fn startup_probe(config: AppConfig) {
    match crate::probe_venice(&config, Duration::from_secs(5)).await {
        Ok(answer) => tracing::info!(upstream = UPSTREAM, "{answer}"),
        Err(why) => tracing::warn!(upstream = UPSTREAM, "Venice is not reachable: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_short_printable_ascii_names() {
        for good in ["Italia", "Foscari_Banker", "sea_trader", "a", "x.y-z9"] {
            assert!(VeniceUsername::parse("username", good).is_ok(), "{good}");
        }
        let long = "a".repeat(USERNAME_MAX + 1);
        for bad in [
            "",
            "a\u{0}b",
            "a\nb",
            "a b",
            "a/b",
            "-a",
            ".",
            "..",
            "é",
            long.as_str(),
        ] {
            assert!(VeniceUsername::parse("username", bad).is_err(), "{bad:?}");
        }
        assert!(VeniceUsername::parse("username", &"a".repeat(USERNAME_MAX)).is_ok());
    }
}
