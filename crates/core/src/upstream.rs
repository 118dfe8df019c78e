//! The HTTP client for third-party APIs (Venice, Stripe): one pool, deadlines on connect and
//! on every request, rustls for TLS.

use std::time::Duration;

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
