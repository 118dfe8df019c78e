//! Cascade's HTTP server: composes the modules and the cross-cutting HTTP layer.
//!
//! - [`settings`]: every setting, the platform's and each module's, parsed together;
//! - [`application`]: [`Application::build`], the one way to build the application;
//! - [`http`]: middleware, health, metrics, the dashboard and the composed [`app`](http::app);
//! - [`auth`]: accounts, sessions and tokens over HTTP;
//! - [`process`]: logging set-up and the termination signals of the binaries;
//! - [`testing`]: the real application in-process on a free port, for the modules' tests;
//! - [`serve`]: run a router on a listener until a shutdown signal, draining in-flight requests.
//!
//! What a module needs from HTTP lives below the modules, in `cascade-http`; the modules
//! themselves (`cascade-catalog`, `cascade-app`) are composed here and nowhere else.

pub mod application;
pub mod auth;
pub mod http;
pub mod process;
pub mod settings;
pub mod state;
pub mod testing;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

pub use application::{Application, BuildOptions};
pub use settings::{RawSettings, Settings};

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish,
/// for at most `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = signalled_tx.send(());
    };
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
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
