//! Cascade's HTTP and WebSocket server.
//!
//! - [`state`]: the shared [`AppState`](state::AppState) handed to every handler;
//! - [`http`]: middleware, the error type, health endpoints and the composed [`app`](http::app);
//! - [`auth`]: accounts, sessions and tokens over HTTP, the [`CurrentUser`](auth::CurrentUser)
//!   extractor and rate limits;
//! - one module per application: [`cascade`], [`agents`], [`catalog`];
//! - [`serve`]: run the app on a listener until a shutdown signal, draining in-flight requests.

pub mod agents;
pub mod auth;
pub mod bench;
pub mod cascade;
pub mod catalog;
pub mod http;
pub mod state;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish,
/// for at most `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: state::AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = signalled_tx.send(());
    };
    let app = http::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        _ = async {
            let _ = signalled_rx.await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(?drain_timeout, "in-flight requests did not finish in time; stopping anyway");
            Ok(())
        }
    }
}
