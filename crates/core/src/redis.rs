//! The Redis client every module shares.
//!
//! A bare `MultiplexedConnection` never reconnects; redis-rs's `ConnectionManager` does, but
//! fails the command that hit the broken connection (PITFALLS 3). We build the manager lazily,
//! so Cascade starts (and serves, from PostgreSQL) while Redis is still down, and give every
//! command a response deadline, so a stopped or unreachable Redis costs a request at most
//! `REDIS_TIMEOUT`, never a hang. Callers treat failures as "Redis is down right now".

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;

use crate::config::RedisConfig;

/// A cheap-to-clone handle; clones share one multiplexed, self-healing connection.
#[derive(Clone)]
pub struct Redis {
    /// Boxed: with TLS settings the client is ~300 bytes, and `Redis` is moved around in enums.
    client: std::sync::Arc<redis::Client>,
    manager: ConnectionManager,
    display: String,
    timeout: Duration,
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

#[derive(Debug, thiserror::Error)]
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
        let client = match &config.ca_cert {
            None => redis::Client::open(config.url.expose())?,
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|err| {
                    RedisError::Config(format!("REDIS_CA_CERT {}: {err}", path.display()))
                })?;
                let _ = rustls::crypto::ring::default_provider().install_default();
                redis::Client::build_with_tls(
                    config.url.expose(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )?
            }
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        Ok(Redis {
            client: std::sync::Arc::new(client),
            manager,
            display: config.display.clone(),
            timeout: config.timeout,
        })
    }

    /// The connection, for commands. Clone it per call; it is a handle.
    pub fn connection(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// A dedicated pub/sub connection (the bus), opened under the deadline. It does not
    /// reconnect by itself: its owner notices the end of its stream and opens a new one.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, RedisError> {
        match tokio::time::timeout(self.timeout * 4, self.client.get_async_pubsub()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout * 4)),
        }
    }

    /// The deadline every command must answer within.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The URL with its password redacted.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Runs one command under the deadline.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let mut conn = self.manager.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// Runs one Lua script invocation under the deadline.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let mut conn = self.manager.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// Runs `evalsha`, an `EVALSHA` of `script` built by the caller, under the deadline
    /// (one command buffer, where a `ScriptInvocation` copies its keys and arguments into a
    /// second). A Redis that does not know the script (restarted, flushed) is sent it once.
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        evalsha: &redis::Cmd,
    ) -> Result<T, RedisError> {
        let mut conn = self.manager.clone();
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
        match tokio::time::timeout(self.timeout, run).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// `INFO memory` under the deadline.
    pub async fn memory(&self) -> Result<RedisMemory, RedisError> {
        let info: String = self.query(redis::cmd("INFO").arg("memory")).await?;
        RedisMemory::parse(&info).ok_or_else(|| {
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
