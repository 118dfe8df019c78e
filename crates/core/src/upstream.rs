//! The HTTP client for third-party APIs (seed 001's citizen ledger and payments): one pool, deadlines on connect and
//! on every request, rustls for TLS.
//!
//! [`Connector`] (`upstream/connector.rs`) is what a module reads an upstream through: its
//! own pool, retries, a circuit breaker (`upstream/breaker.rs`), cached answers and
//! stale-if-error.

mod breaker;
mod connector;

use std::time::Duration;

pub use connector::{Connector, Fetched, UpstreamError, UpstreamSettings};

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

/// Sends `request` to the third-party API named `upstream` (a fixed
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-request HTTP server on a free port that answers `status`.
    async fn answering(status: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = socket.write_all(reply.as_bytes()).await;
        });
        format!("http://{address}/get-ledger")
    }

    #[test]
    fn every_upstream_call_is_timed_and_failures_are_counted() {
        let recorder = PrometheusBuilder::new()
            .set_buckets(crate::metrics::LATENCY_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The recorder is local to this thread, which the current-thread runtime runs on.
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let client =
                    super::http_client(Duration::from_secs(1), Duration::from_secs(2)).unwrap();
                for status in [200, 503] {
                    let url = answering(status).await;
                    let response = super::send("ledger", client.get(url)).await.unwrap();
                    assert_eq!(response.status().as_u16(), status);
                }
            })
        });
        let text = handle.render();
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no {needle} in:\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let count = "cascade_upstream_request_duration_seconds_count";
        assert_eq!(
            line(&format!("{count}{{upstream=\"ledger\",outcome=\"ok\"}}")),
            "1"
        );
        assert_eq!(
            line(&format!(
                "{count}{{upstream=\"ledger\",outcome=\"http_error\"}}"
            )),
            "1"
        );
        assert_eq!(
            line("cascade_upstream_errors_total{upstream=\"ledger\",kind=\"http_error\"}"),
            "1"
        );
        assert!(!text.contains("kind=\"ok\""), "a success is not an error");
    }
}
