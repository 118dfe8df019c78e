//! The real application, in-process, for tests: [`TestApp::start`] builds it with
//! [`Application::build`] from the variables a test names (nothing from the process's
//! environment or a `.env`), serves it on a free loopback port, and stops it on drop.
//!
//! It runs on a runtime and thread of its own, as a separate process would: a test that blocks
//! its own thread (a `redis-cli` call, a sleep) does not stall the server, and several
//! instances sharing one PostgreSQL and one Redis behave like several processes.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use cascade_core::events::Events;
use cascade_realtime::Realtime;
use tokio::sync::oneshot;

use crate::{Application, BuildOptions, Settings};

/// A running application; stopped (drained, tasks joined, pool closed) when dropped.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The instance's domain events: a test subscribes here to see what it publishes and
    /// receives.
    pub events: Events,
    /// The instance's real-time channels: a test publishes server-side through it (on the
    /// instance's runtime, with [`run`](Self::run)).
    pub realtime: Realtime,
    /// The instance's runtime, for work that must run where the application's connections do.
    runtime: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestApp {
    /// Builds and serves the application configured by `vars` (`("DATABASE_URL", url)`, ...).
    /// Panics with the reason when it cannot start.
    pub async fn start(vars: &[(&str, String)]) -> TestApp {
        // A test's server drains for a few seconds at most when dropped, unless it says otherwise.
        let mut vars: Vec<(&str, String)> = vars.to_vec();
        if !vars.iter().any(|(var, _)| *var == "SHUTDOWN_TIMEOUT") {
            vars.push(("SHUTDOWN_TIMEOUT", "3s".into()));
        }
        let settings = Settings::from_vars(&vars).unwrap_or_else(|e| panic!("settings: {e}"));
        type Ready = Result<(String, Events, Realtime, tokio::runtime::Handle), String>;
        let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the test server");
            runtime.block_on(async move {
                let started = async {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .map_err(|e| e.to_string())?;
                    let base = format!(
                        "http://{}",
                        listener.local_addr().map_err(|e| e.to_string())?
                    );
                    let app = Application::build(settings, BuildOptions::default())
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    Ok::<_, String>((listener, base, app))
                };
                match started.await {
                    Ok((listener, base, app)) => {
                        let handle = tokio::runtime::Handle::current();
                        let _ = ready_tx.send(Ok((
                            base,
                            app.state.events.clone(),
                            app.realtime.clone(),
                            handle,
                        )));
                        let stop = async {
                            let _ = stop_rx.await;
                        };
                        if let Err(err) = app.serve(listener, stop).await {
                            tracing::error!("test server failed: {err:#}");
                        }
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            });
        });
        let (base, events, realtime, runtime) =
            match tokio::time::timeout(Duration::from_secs(90), ready_rx).await {
                Ok(Ok(Ok(ready))) => ready,
                Ok(Ok(Err(err))) => panic!("the application did not start: {err}"),
                Ok(Err(_)) => panic!("the application's thread ended before it started"),
                Err(_) => panic!("the application did not start within 90 s"),
            };
        TestApp {
            base,
            events,
            realtime,
            runtime,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl TestApp {
    /// Runs `work` on the application's runtime (its pool's and Redis client's connections
    /// live there) and returns its output.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> T {
        self.runtime
            .spawn(work)
            .await
            .expect("work on the application's runtime panicked")
    }

    /// Waits, at most `bound`, until every real-time shard of the instance is subscribed in
    /// Redis; false if not.
    pub async fn realtime_listening(&self, bound: Duration) -> bool {
        wait_until(bound, || self.realtime.listening()).await
    }

    /// Waits, at most `bound`, until the instance hears other instances' events; false if not.
    pub async fn events_listening(&self, bound: Duration) -> bool {
        wait_until(bound, || self.events.listening()).await
    }
}

/// Polls `ready` every 20 ms for at most `bound`.
async fn wait_until(bound: Duration, ready: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while !ready() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
