//! `cascade-bench bare`: the ceiling the suite measures against (SPEC, issue 13): a bare axum
//! server, no middleware at all, returning a fixed JSON body of the size of an asset, in its
//! own process. Comparing against Cascade's own stack serving a fixed body would hide what the
//! middleware costs; this is what the machine's HTTP path gives with nothing on it.

use std::process::ExitCode;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::get;

/// The route the ceiling answers on.
pub const PATH: &str = "/fixed";

/// `bytes` bytes of JSON (a string of `x`), built once.
fn body(bytes: usize) -> Bytes {
    let mut body = Vec::with_capacity(bytes.max(2));
    body.push(b'"');
    body.resize(bytes.max(2) - 1, b'x');
    body.push(b'"');
    Bytes::from(body)
}

pub async fn run(host: &str, port: u16, bytes: usize) -> anyhow::Result<ExitCode> {
    let body = body(bytes);
    let app = Router::new().route(
        PATH,
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    println!("bare axum listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(cascade_server::process::termination())
        .await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_json_of_the_asked_size() {
        let b = body(1190);
        assert_eq!(b.len(), 1190);
        assert!(serde_json::from_slice::<String>(&b).is_ok());
    }
}
