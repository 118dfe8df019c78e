//! The ceiling: `cascade-bench bare` (a bare axum server returning a fixed body of an asset's
//! size, no middleware) as its own process, measured by wrk in the same run as everything
//! else, so every row can say what fraction of the machine's bare HTTP throughput it reaches.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::client::Client;

/// The running bare server; killed on drop (it holds no state worth draining).
pub struct Ceiling {
    pub base: String,
    child: Child,
}

impl Ceiling {
    /// Starts it on a free loopback port with a body of `bytes` bytes, and waits until it
    /// answers.
    pub async fn start(bytes: usize) -> anyhow::Result<Ceiling> {
        let port = cascade_testkit::free_port();
        let child = Command::new(std::env::current_exe()?)
            .args([
                "bare",
                "--port",
                &port.to_string(),
                "--bytes",
                &bytes.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting cascade-bench bare")?;
        let mut ceiling = Ceiling {
            base: format!("http://127.0.0.1:{port}"),
            child,
        };
        until_answers(
            &ceiling.base,
            crate::bare::PATH,
            &mut ceiling.child,
            "cascade-bench bare",
        )
        .await?;
        Ok(ceiling)
    }
}

/// Waits up to 20 s until `GET {base}{path}` answers 2xx, failing at once if `child`, the
/// server (`what`), exits meanwhile.
pub(super) async fn until_answers(
    base: &str,
    path: &str,
    child: &mut Child,
    what: &str,
) -> anyhow::Result<()> {
    let client = Client::new(base)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if client.get_ok(path).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not answer within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
