//! The HTTP client for third-party APIs (Venice, Stripe): one pool, deadlines on connect and
//! on every request, rustls for TLS.

use std::time::Duration;

use crate::metrics::{self, UpstreamOutcome};

/// Builds the shared upstream HTTP client. rustls needs a process-wide crypto provider;
/// we install ring's (small, pure Rust + asm) once, here.
pub fn http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> reqwest::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("cascade/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends `request` to the third-party API named `upstream` (`"venice"`, `"stripe"`: a fixed
/// name, not a URL) and records its latency and outcome
/// (`cascade_upstream_request_duration_seconds`, `cascade_upstream_errors_total`). Every
/// upstream call goes through here, so none escapes the metrics.
pub async fn send(
    upstream: &'static str,
    request: reqwest::RequestBuilder,
) -> reqwest::Result<reqwest::Response> {
    let started = std::time::Instant::now();
    let result = request.send().await;
    let outcome = match &result {
        Ok(response)
            if response.status().is_client_error() || response.status().is_server_error() =>
        {
            UpstreamOutcome::HttpError
        }
        Ok(_) => UpstreamOutcome::Ok,
        Err(err) if err.is_timeout() => UpstreamOutcome::Timeout,
        Err(_) => UpstreamOutcome::Error,
    };
    metrics::record_upstream(upstream, outcome, started.elapsed());
    result
}
