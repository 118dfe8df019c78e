//! The server under test: `cascade-bench serve` (this binary) as a child process, so the
//! load the suite generates and the server do not share a runtime, and so a scenario can take
//! PostgreSQL or Redis away from a server that does not know it is being measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::client::Client;

/// The Redis a server is started on.
#[derive(Clone, Copy)]
pub enum RedisAt<'a> {
    /// One server: `REDIS_URL`.
    Server(&'a str),
    /// A Redis Cluster's seed nodes, comma-separated: `REDIS_CLUSTER_URLS`.
    Cluster(&'a str),
}

/// The running server; stopped (SIGTERM, then SIGKILL after 20 s) on drop.
pub struct ServerProc {
    pub base: String,
    child: Child,
    /// Its stderr: the first place to look when a scenario fails.
    log: PathBuf,
}

impl ServerProc {
    /// Starts it on a free loopback port, on the given PostgreSQL, Redis and stand-ins.
    pub fn start(
        work: &Path,
        name: &str,
        database_url: &str,
        redis: RedisAt<'_>,
        venice_url: &str,
        stripe_url: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = cascade_testkit::free_port();
        let log = work.join(format!("{name}.log"));
        let redis = match redis {
            RedisAt::Server(url) => ("REDIS_URL", url),
            RedisAt::Cluster(urls) => ("REDIS_CLUSTER_URLS", urls),
        };
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .envs(extra.iter().copied())
            .env("DATABASE_URL", database_url)
            .env(redis.0, redis.1)
            .env("VENICE_API_URL", venice_url)
            .env(
                "VENICE_POOL_SIZE",
                super::citizens::VENICE_POOL_SIZE.to_string(),
            )
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .env("RATE_LIMIT_API", "off")
            // The webhooks scenario: Stripe played by the suite's stand-in; no reconciliation.
            .env("STRIPE_API_URL", stripe_url)
            .env("STRIPE_API_KEY", cascade_testkit::stripe::TEST_KEY)
            .env("STRIPE_WEBHOOK_SECRET", super::webhooks::SECRET)
            .env("STRIPE_PRICES_JSON", super::webhooks::PRICES)
            .env("STRIPE_RECONCILE_INTERVAL", "0")
            // The spaces scenario registers one account per client.
            .env("RATE_LIMIT_AUTH", "off")
            .env("ADMIN_TOKEN", super::client::ADMIN_TOKEN)
            // One signing key for every server of the run: a token one issues, another takes.
            .env("JWT_SECRET", jwt_secret())
            // The real-time scenario holds every connection with the bench account's token.
            .env("WS_MAX_CONNECTIONS_PER_USER", "100000")
            .env("WS_MAX_CONNECTIONS", "100000")
            // The broadcast publishes up to 1,000 messages/s from one connection.
            .env("WS_PUBLISH_RATE", "100000")
            // The bench account's one token must outlive the longest run.
            .env("ACCESS_TOKEN_TTL", "24h")
            .env("SESSION_DEFAULT_TTL", "24h")
            // Four connections a core (8 here), or BENCH_PG_POOL_MAX's (to measure the pool's
            // size): see `pool_max`.
            .env(
                "PG_POOL_MAX",
                std::env::var("BENCH_PG_POOL_MAX").unwrap_or_else(|_| pool_max().to_string()),
            )
            // The executions scenario runs workers of its own (`cascade-bench worker`), and
            // counts them: none in the server.
            .env("AGENTS_WORKERS", "0")
            .env("REDIS_TIMEOUT", "250ms")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting cascade-bench serve")?;
        Ok(ServerProc {
            base: format!("http://127.0.0.1:{port}"),
            child,
            log,
        })
    }

    /// Waits until `/health` answers; fails at once, with its log, if the server exits.
    pub async fn wait_ready(&mut self, bound: Duration) -> anyhow::Result<()> {
        let client = Client::new(&self.base)?;
        let deadline = Instant::now() + bound;
        while client.get_ok("/health").await.is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "cascade-bench serve exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "cascade-bench serve did not answer within {bound:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// The server's PostgreSQL pool: four connections per core of this machine (the suite's
/// PostgreSQL runs on it), 8 to 32. PostgreSQL's own sizing advice is about twice its cores
/// plus its disks: more backends than that only queue for the same cores. Measured here (2
/// cores, 64 writers, README "Writes and the pool's size"): 32 connections gave the writes a
/// p99 of 40-132 ms, 8 gave 30-53 ms at the same rate, and no read row lost.
fn pool_max() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (4 * cores).clamp(8, 32)
}

/// The run's JWT signing key: random, the same for each server process it starts.
fn jwt_secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| format!("{:032x}", fastrand::u128(..)).repeat(2))
}

impl ServerProc {
    /// Its process id (the real-time scenario reads its resident memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crashed host or the OOM killer would stop it; returns once it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // Already gone (killed): its pid may be another process's by now.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM lets it drain and stop its tasks, as in production.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
