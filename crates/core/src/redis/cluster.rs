//! Redis Cluster through the `redis` crate's async cluster client (`cluster-async`).
//!
//! The client is connected by the first command, not at start-up, so Cascade starts (and
//! serves, from PostgreSQL) while the cluster is still down, as with one server. Once
//! connected it keeps one multiplexed connection per node, routes each command by its key's
//! slot, follows `MOVED`/`ASK` and refreshes the slot map when a node fails or slots move;
//! commands for the slots of a failed master fail (as when Redis is down) until a replica is
//! promoted.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;

use super::{RedisError, RedisMemory};

pub(super) struct Cluster {
    client: ClusterClient,
    /// Set by the first successful connection, kept for good: the client heals itself.
    connection: OnceLock<ClusterConnection>,
    /// One connection attempt at a time: concurrent first commands wait for it rather than
    /// each opening connections to every node.
    connecting: tokio::sync::Mutex<()>,
    /// The seed nodes' URLs and the CA certificate, for the sharded subscriptions' clients
    /// ([`Cluster::sharded`]).
    urls: Vec<String>,
    root_cert: Option<Vec<u8>>,
    /// A client per seed node, for classic pub/sub.
    seeds: Vec<redis::Client>,
    /// The seed the next pub/sub connection tries first: the one after the last used, so a
    /// subscriber whose node failed moves on to another.
    next_seed: AtomicUsize,
    timeout: Duration,
}

impl Cluster {
    /// The client for the seed nodes `urls` (`seeds`: a client of each); nothing connects
    /// yet.
    pub(super) fn new(
        urls: &[&str],
        seeds: Vec<redis::Client>,
        root_cert: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Cluster, RedisError> {
        let urls: Vec<String> = urls.iter().map(|url| url.to_string()).collect();
        Ok(Cluster {
            client: builder(&urls, root_cert.clone(), timeout).build()?,
            urls,
            root_cert,
            connection: OnceLock::new(),
            connecting: tokio::sync::Mutex::new(()),
            seeds,
            next_seed: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The connected client, if the first connection succeeded.
    pub(super) fn current(&self) -> Option<ClusterConnection> {
        self.connection.get().cloned()
    }

    /// Connects the client (asks a seed node for the slot map, connects to every master);
    /// the caller bounds it.
    pub(super) async fn connect(&self) -> Result<ClusterConnection, RedisError> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let conn = self.client.get_async_connection().await?;
        Ok(self.connection.get_or_init(|| conn).clone())
    }

    /// A sharded subscription to `channels`: its own cluster client, in RESP3 with a push
    /// sender (what redis-rs needs to deliver `SSUBSCRIBE` messages and resubscribe after a
    /// reconnection or a slot-map change), connected under the timeout.
    pub(super) async fn sharded(
        &self,
        channels: Vec<String>,
    ) -> Result<super::sharded::ShardedSubscription, RedisError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = builder(&self.urls, self.root_cert.clone(), self.timeout)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        let connect = client.get_async_connection();
        let conn = match tokio::time::timeout(self.timeout * 2, connect).await {
            Ok(conn) => conn?,
            Err(_) => return Err(RedisError::Timeout(self.timeout * 2)),
        };
        super::sharded::ShardedSubscription::start(conn, rx, channels, self.timeout).await
    }

    /// A pub/sub connection to the first seed node that answers, starting after the last one
    /// used; each attempt bounded by the timeout.
    pub(super) async fn pubsub(&self) -> Result<redis::aio::PubSub, RedisError> {
        let start = self.next_seed.load(Ordering::Relaxed);
        let mut last = RedisError::Config("REDIS_CLUSTER_URLS names no node".into());
        for i in 0..self.seeds.len() {
            let at = (start + i) % self.seeds.len();
            match tokio::time::timeout(self.timeout * 2, self.seeds[at].get_async_pubsub()).await {
                Ok(Ok(pubsub)) => {
                    self.next_seed.store(at + 1, Ordering::Relaxed);
                    return Ok(pubsub);
                }
                Ok(Err(err)) => last = err.into(),
                Err(_) => last = RedisError::Timeout(self.timeout * 2),
            }
        }
        self.next_seed.store(start + 1, Ordering::Relaxed);
        Err(last)
    }
}

/// The cluster client's settings: every connection and response bounded by `timeout`.
fn builder(urls: &[String], root_cert: Option<Vec<u8>>, timeout: Duration) -> ClusterClientBuilder {
    let mut builder = ClusterClientBuilder::new(urls.to_vec())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        // Each command is bounded by REDIS_TIMEOUT anyway ([`super::Redis::query`]); a few
        // quick retries ride out a MOVED after resharding or a refreshed slot map.
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100);
    if let Some(pem) = root_cert {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
    }
    builder
}

/// The memory of the fullest server in an `INFO memory` reply: one server's text, or a
/// cluster's map of node → text (nodes that failed to answer are skipped).
pub(super) fn fullest(reply: redis::Value) -> Option<RedisMemory> {
    let text = |value: redis::Value| -> Option<String> { redis::from_redis_value(value).ok() };
    match reply {
        redis::Value::Map(nodes) => nodes
            .into_iter()
            .filter_map(|(_, info)| RedisMemory::parse(&text(info)?))
            .max_by(|a, b| {
                let ratio = |m: &RedisMemory| m.used_ratio().unwrap_or(0.0);
                ratio(a).total_cmp(&ratio(b))
            }),
        single => RedisMemory::parse(&text(single)?),
    }
}

#[cfg(test)]
mod tests {
    use super::fullest;

    #[test]
    fn a_cluster_reports_its_fullest_master() {
        let info = |used: u64| {
            redis::Value::BulkString(
                format!("used_memory:{used}\r\nmaxmemory:1000\r\n").into_bytes(),
            )
        };
        let key = |k: &str| redis::Value::BulkString(k.as_bytes().to_vec());
        let reply = redis::Value::Map(vec![
            (key("a:1"), info(100)),
            (key("b:2"), info(700)),
            (key("c:3"), redis::Value::Nil),
            (key("d:4"), info(300)),
        ]);
        assert_eq!(fullest(reply).unwrap().used_memory, 700);
        assert_eq!(fullest(info(5)).unwrap().used_memory, 5);
    }
}
