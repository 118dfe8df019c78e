//! The Redis client every module shares.
//!
//! A bare `MultiplexedConnection` never reconnects; redis-rs's `ConnectionManager` does, but
//! fails the command that hit the broken connection (PITFALLS 3). We build the manager lazily,
//! so Cascade starts (and serves, from PostgreSQL) while Redis is still down, and give every
//! command a response deadline, so a stopped or unreachable Redis costs a request at most
//! `REDIS_TIMEOUT`, never a hang. Callers treat failures as "Redis is down right now".
//!
//! With Redis Sentinel (`REDIS_SENTINEL_URLS`), the manager is the current master's, and a
//! failure that may mean the master moved has the sentinels asked again ([`sentinel`]): after
//! a failover, commands fail (as when Redis is down) until the promoted replica is found.
//!
//! With Redis Cluster (`REDIS_CLUSTER_URLS`), commands go through the `redis` crate's async
//! cluster client ([`cluster`]), which routes each by its key's slot, follows `MOVED`/`ASK`
//! and refreshes the slot map after a failover; a script's keys must share one slot (the
//! cache tier's layout sees to it, `cache/redis_tier.rs`). Pub/sub on a cluster is sharded
//! ([`Redis::sharded_subscribe`], [`Redis::publish`]: `SSUBSCRIBE`/`SPUBLISH`, [`sharded`]).

mod cluster;
mod sentinel;
mod sharded;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;

use crate::config::RedisConfig;

use self::cluster::Cluster;
use self::sentinel::Sentinels;
pub use self::sharded::{ShardEvent, ShardedSubscription};

/// A cheap-to-clone handle; clones share one multiplexed, self-healing connection.
#[derive(Clone)]
pub struct Redis {
    target: Target,
    display: String,
    timeout: Duration,
}

#[derive(Clone)]
enum Target {
    /// One server, at `REDIS_URL`.
    Direct {
        /// Boxed: with TLS settings the client is ~300 bytes, and `Redis` is moved around in
        /// enums.
        client: Arc<redis::Client>,
        manager: ConnectionManager,
    },
    /// Whichever server the sentinels name master.
    Sentinel(Arc<Sentinels>),
    /// A Redis Cluster, through its seed nodes.
    Cluster(Arc<Cluster>),
}

/// A command's connection: one server's, or the cluster client (which routes each command
/// to its slot's master).
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Redis's memory use, from `INFO memory`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RedisMemory {
    pub used_memory: u64,
    /// 0 when no limit is set.
    pub maxmemory: u64,
    /// The host's memory as Redis sees it; 0 if Redis does not report it.
    pub total_system_memory: u64,
}

impl RedisMemory {
    /// Parses the `field:value` lines of `INFO memory`.
    pub fn parse(info: &str) -> Option<RedisMemory> {
        let field = |name: &str| {
            info.lines().find_map(|line| {
                let (key, value) = line.trim_end().split_once(':')?;
                (key == name).then(|| value.parse::<u64>().ok()).flatten()
            })
        };
        Some(RedisMemory {
            used_memory: field("used_memory")?,
            maxmemory: field("maxmemory").unwrap_or(0),
            total_system_memory: field("total_system_memory").unwrap_or(0),
        })
    }

    /// What "full" means: `maxmemory`, or the host's memory when Redis has no limit (it then
    /// grows until the machine swaps or the OOM killer stops it). None if neither is known.
    pub fn limit(&self) -> Option<u64> {
        [self.maxmemory, self.total_system_memory]
            .into_iter()
            .find(|&limit| limit > 0)
    }

    /// `used_memory / limit()`.
    pub fn used_ratio(&self) -> Option<f64> {
        self.limit()
            .map(|limit| self.used_memory as f64 / limit as f64)
    }
}

/// Redis's status under a deadline.
#[derive(Debug, Clone, Serialize)]
pub struct RedisHealth {
    pub up: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Command(#[from] redis::RedisError),
    #[error("Redis configuration: {0}")]
    Config(String),
}

impl Redis {
    /// Prepares the client without connecting: the first command connects, and every later
    /// one reconnects if the connection broke.
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let root_cert = match &config.ca_cert {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|err| {
                    RedisError::Config(format!("REDIS_CA_CERT {}: {err}", path.display()))
                })?;
                let _ = rustls::crypto::ring::default_provider().install_default();
                Some(pem)
            }
        };
        let client = |url: &str| -> Result<redis::Client, RedisError> {
            Ok(match &root_cert {
                Some(pem) if url.starts_with("rediss://") => redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                )?,
                _ => redis::Client::open(url)?,
            })
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let target = match (&config.sentinel, &config.cluster) {
            (None, Some(nodes)) => {
                let urls: Vec<&str> = nodes.urls.iter().map(|url| url.expose()).collect();
                let clients = urls
                    .iter()
                    .map(|url| client(url))
                    .collect::<Result<Vec<_>, _>>()?;
                Target::Cluster(Arc::new(Cluster::new(
                    &urls,
                    clients,
                    root_cert.clone(),
                    config.timeout,
                )?))
            }
            (None, None) => {
                let client = client(config.url.expose())?;
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
                Target::Direct {
                    client: Arc::new(client),
                    manager,
                }
            }
            (Some(sentinel), _) => {
                let nodes = sentinel
                    .urls
                    .iter()
                    .map(|url| {
                        let info = client(url.expose())?.get_connection_info().clone();
                        Ok((info, crate::config::redact_url(url.expose())))
                    })
                    .collect::<Result<Vec<_>, RedisError>>()?;
                let template = client(config.url.expose())?.get_connection_info().clone();
                Target::Sentinel(Arc::new(Sentinels::new(
                    nodes,
                    sentinel.master.clone(),
                    template,
                    manager_config,
                    config.timeout,
                )))
            }
        };
        Ok(Redis {
            target,
            display: config.display.clone(),
            timeout: config.timeout,
        })
    }

    /// The connection of one server, for commands (a pipeline, say), under the caller's own
    /// deadline. Clone it per call; it is a handle. With Sentinel it is the current master's,
    /// found first if none is known yet. A Redis Cluster has no one server: an error names the
    /// limitation (what needs this, the tier migration, reads one server).
    pub async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        match &self.target {
            Target::Direct { manager, .. } => Ok(manager.clone()),
            Target::Sentinel(sentinels) => {
                sentinels.watch();
                Ok(sentinels.master().await?.manager.clone())
            }
            Target::Cluster(_) => Err(RedisError::Config(
                "this needs one Redis server and REDIS_CLUSTER_URLS names a Redis Cluster".into(),
            )),
        }
    }

    /// Whether this is a Redis Cluster (`REDIS_CLUSTER_URLS`): scripts must keep their keys in
    /// one slot.
    /// A client of the test server at `url` with a generous deadline (unit tests).
    #[cfg(test)]
    pub(crate) fn for_test(url: String) -> Redis {
        Redis::new(&RedisConfig {
            url: crate::config::Secret::new(url),
            display: "test".into(),
            timeout: Duration::from_secs(5),
            ca_cert: None,
            sentinel: None,
            cluster: None,
        })
        .expect("a valid test URL")
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The connection, unless the master is still to be found (Sentinel) or the cluster
    /// client still to be connected.
    fn known_connection(&self) -> Option<Conn> {
        match &self.target {
            Target::Direct { manager, .. } => Some(Conn::Single(manager.clone())),
            Target::Sentinel(sentinels) => {
                sentinels.current().map(|m| Conn::Single(m.manager.clone()))
            }
            Target::Cluster(cluster) => cluster.current().map(Conn::Cluster),
        }
    }

    /// A command's connection and its deadline, `REDIS_TIMEOUT` from now (finding the
    /// master first, with Sentinel, or connecting the cluster client, counts against it).
    async fn start(&self) -> Result<(Conn, tokio::time::Instant), RedisError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        if let Some(conn) = self.known_connection() {
            return Ok((conn, deadline));
        }
        let find = async {
            match &self.target {
                Target::Cluster(cluster) => cluster.connect().await.map(Conn::Cluster),
                _ => self.connection().await.map(Conn::Single),
            }
        };
        let result = match tokio::time::timeout_at(deadline, find).await {
            Ok(result) => result.map(|conn| (conn, deadline)),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        };
        self.observe(&result);
        result
    }

    /// A command's outcome under its deadline; with Sentinel, a failure that may mean the
    /// master moved has it looked up again.
    fn finish<T>(
        &self,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, RedisError> {
        let result = match outcome {
            Ok(result) => result.map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        };
        self.observe(&result);
        result
    }

    /// A dedicated classic pub/sub connection, opened under the deadline. It does not
    /// reconnect by itself: its owner notices the end of its stream and opens a new one.
    /// With Sentinel, the sentinels are asked where the master is first. With Redis Cluster it
    /// is one node's, the next seed node that answers after the last one used: a classic
    /// `PUBLISH` reaches every node of a cluster, so any node hears every message (Cascade's
    /// own channels use [`sharded_subscribe`](Self::sharded_subscribe) there).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, RedisError> {
        let bound = self.timeout * 4;
        let open = async {
            match &self.target {
                Target::Direct { client, .. } => Ok(client.get_async_pubsub().await?),
                Target::Sentinel(sentinels) => {
                    sentinels.watch();
                    let master = sentinels.resolve(Instant::now()).await?;
                    Ok(master.client.get_async_pubsub().await?)
                }
                Target::Cluster(cluster) => cluster.pubsub().await,
            }
        };
        let result = match tokio::time::timeout(bound, open).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::Timeout(bound)),
        };
        self.observe(&result);
        result
    }

    /// A sharded subscription to `channels` (`SSUBSCRIBE`), on a Redis Cluster only (elsewhere
    /// an error names the limitation: use [`pubsub`](Self::pubsub)). It has its own cluster
    /// client, connected under the deadline, and heals itself ([`ShardedSubscription`]).
    pub async fn sharded_subscribe(
        &self,
        channels: Vec<String>,
    ) -> Result<ShardedSubscription, RedisError> {
        match &self.target {
            Target::Cluster(cluster) => cluster.sharded(channels).await,
            _ => Err(RedisError::Config(
                "sharded pub/sub is for a Redis Cluster (REDIS_CLUSTER_URLS)".into(),
            )),
        }
    }

    /// Publishes `payload` on `channel` under the deadline: `SPUBLISH` on a Redis Cluster
    /// (heard by [`sharded_subscribe`](Self::sharded_subscribe)), `PUBLISH` elsewhere (heard
    /// by [`pubsub`](Self::pubsub) subscribers). Returns how many subscribers received it.
    pub async fn publish(
        &self,
        channel: &str,
        payload: impl redis::ToRedisArgs,
    ) -> Result<i64, RedisError> {
        let command = if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        self.query(redis::cmd(command).arg(channel).arg(payload))
            .await
    }

    /// The deadline every command must answer within.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The URL with its password redacted (with Sentinel: the master's name and the
    /// sentinels' URLs).
    pub fn display(&self) -> &str {
        &self.display
    }

    /// With Sentinel, the master's `host:port` as last found; None before the first lookup
    /// and without Sentinel.
    pub fn sentinel_master(&self) -> Option<String> {
        match &self.target {
            Target::Direct { .. } | Target::Cluster(_) => None,
            Target::Sentinel(sentinels) => sentinels.current().map(|m| m.addr.clone()),
        }
    }

    /// With Sentinel, a failure that may mean the master moved has it looked up again.
    fn observe<T>(&self, result: &Result<T, RedisError>) {
        if let (Target::Sentinel(sentinels), Err(err)) = (&self.target, result)
            && sentinel::may_have_moved(err)
        {
            sentinels.suspect();
        }
    }

    /// Runs one command under the deadline.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let (mut conn, deadline) = self.start().await?;
        self.finish(tokio::time::timeout_at(deadline, cmd.query_async(&mut conn)).await)
    }

    /// Runs a pipeline under the deadline: one round trip (on a Redis Cluster, every key of
    /// it in one slot).
    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        let (mut conn, deadline) = self.start().await?;
        self.finish(tokio::time::timeout_at(deadline, pipe.query_async(&mut conn)).await)
    }

    /// Runs one Lua script invocation under the deadline.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let (mut conn, deadline) = self.start().await?;
        self.finish(tokio::time::timeout_at(deadline, invocation.invoke_async(&mut conn)).await)
    }

    /// Runs `evalsha`, an `EVALSHA` of `script` built by the caller, under the deadline
    /// (one command buffer, where a `ScriptInvocation` copies its keys and arguments into a
    /// second). A Redis that does not know the script (restarted, flushed, a replica just
    /// promoted) is sent it once.
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        evalsha: &redis::Cmd,
    ) -> Result<T, RedisError> {
        let (mut conn, deadline) = self.start().await?;
        let run = async {
            match evalsha.query_async(&mut conn).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.prepare_invoke().load_async(&mut conn).await?;
                    evalsha.query_async(&mut conn).await
                }
                result => result,
            }
        };
        self.finish(tokio::time::timeout_at(deadline, run).await)
    }

    /// `INFO memory` under the deadline. On a Redis Cluster, the fullest master's (by
    /// [`used_ratio`](RedisMemory::used_ratio)): the one that evicts or refuses writes first.
    pub async fn memory(&self) -> Result<RedisMemory, RedisError> {
        let reply: redis::Value = self.query(redis::cmd("INFO").arg("memory")).await?;
        cluster::fullest(reply).ok_or_else(|| {
            RedisError::Command(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "INFO memory without used_memory",
            )))
        })
    }

    /// `PING` under the deadline.
    pub async fn health(&self) -> RedisHealth {
        let started = Instant::now();
        let result: Result<String, _> = self.query(&redis::cmd("PING")).await;
        RedisHealth {
            up: result.is_ok(),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            error: result.err().map(|e| e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RedisMemory;

    #[test]
    fn memory_ratio_falls_back_to_system_memory_without_maxmemory() {
        let info = "# Memory\r\nused_memory:1000\r\nused_memory_human:1000B\r\ntotal_system_memory:4000\r\nmaxmemory:0\r\n";
        let memory = RedisMemory::parse(info).unwrap();
        assert_eq!(memory.limit(), Some(4000));
        assert_eq!(memory.used_ratio(), Some(0.25));
        let limited =
            RedisMemory::parse("used_memory:500\nmaxmemory:1000\ntotal_system_memory:4000")
                .unwrap();
        assert_eq!(limited.used_ratio(), Some(0.5));
        assert_eq!(RedisMemory::parse("maxmemory:0"), None);
    }
}
