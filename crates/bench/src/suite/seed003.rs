//! Seed 003's own stack beside the miss-heavy walk: `bench/seed003/server.js` (fastify,
//! node-postgres and ioredis, cache-aside, two processes), on the same PostgreSQL and Redis,
//! walked by wrk over the same paths in the same run. SPEC: "Miss-heavy reads: at least 2×
//! seed 003's own stack (fastify + pg + ioredis)". Needs node and the packages `bench/run`
//! installs (`npm ci` in `bench/seed003`); without them the row is left out, saying why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use super::ceiling::until_answers;
use super::which;

/// The row's name.
pub const SEED003: &str = "seed 003's stack (fastify + pg + ioredis, 2 workers), miss-heavy";

/// The running peer; its primary is killed on drop, and its workers leave with it (they exit
/// when their channel to the primary closes).
pub struct Seed003 {
    pub base: String,
    child: Child,
}

/// Where the peer lives: `bench/seed003` of the checkout this binary was built from, whatever
/// the directory it runs in.
fn dir() -> PathBuf {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    let root = crates.and_then(Path::parent).unwrap_or(Path::new("."));
    root.join("bench").join("seed003")
}

impl Seed003 {
    /// Why the peer cannot run here, if it cannot.
    pub fn missing() -> Option<String> {
        let dir = dir();
        if !dir.join("server.js").exists() {
            return Some(format!("no {}", dir.display()));
        }
        if which("node").is_none() {
            return Some("node is not installed".into());
        }
        // fastify 5 needs node 20.
        let recent = Command::new("node")
            .args([
                "-e",
                "process.exit(+process.versions.node.split('.')[0] >= 20 ? 0 : 1)",
            ])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !recent {
            return Some("its fastify needs node 20 or later".into());
        }
        if !dir.join("node_modules").join("fastify").exists() {
            return Some(format!(
                "its packages are not installed (npm ci in {})",
                dir.display()
            ));
        }
        None
    }

    /// Starts it on a free loopback port against the PostgreSQL at `pg_url` (seed 003's
    /// `PG_URL`) and the Redis at `redis_url`, and waits until it answers.
    pub async fn start(pg_url: &str, redis_url: &str) -> anyhow::Result<Seed003> {
        let port = cascade_testkit::free_port();
        let child = Command::new("node")
            .arg(dir().join("server.js"))
            .env("PG_URL", pg_url)
            .env("REDIS_URL", redis_url)
            .env("PORT", port.to_string())
            .env("WORKERS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting bench/seed003/server.js")?;
        let mut peer = Seed003 {
            base: format!("http://127.0.0.1:{port}"),
            child,
        };
        until_answers(&peer.base, "/health", &mut peer.child, "seed 003's stack").await?;
        Ok(peer)
    }
}

impl Drop for Seed003 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
