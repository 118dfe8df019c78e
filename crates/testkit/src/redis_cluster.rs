//! A private Redis Cluster for tests: `masters` primaries, each with `replicas_per_master`
//! replicas, made by `redis-cli --cluster create` out of as many [`RedisServer`]s.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::redis_server::{RedisServer, connect, info};

/// The cluster's nodes; every process has its own temp dir and two free ports (the client
/// port and the cluster bus port, `cluster-port`, both taken by binding port 0: the default
/// bus port, client port + 10000, may not exist), and is killed on drop.
///
/// A node unanswering for 1 s (`cluster-node-timeout 1000`) is failed by the others and a
/// replica of it promoted; the other masters keep serving their slots meanwhile
/// (`cluster-require-full-coverage no`).
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the servers, creates the cluster (slots split evenly over the masters, in
    /// order), and waits until every node says `cluster_state:ok`, knows every other node, and
    /// every replica has synced with its master.
    pub async fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas_per_master) {
            let bus_port = free_port().to_string();
            nodes.push(
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus_port,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-require-full-coverage",
                    "no",
                    // A replica may always stand in for its failed master, however long ago it
                    // last heard from it (tests kill masters right after writes).
                    "--cluster-replica-validity-factor",
                    "0",
                ])
                .await,
            );
        }
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args([
                "--cluster-replicas",
                &replicas_per_master.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create (apt-get install -y redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.settled() {
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle in 30s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster
    }

    /// Every node reports `cluster_state:ok` and knows all the others; every replica's link
    /// to its master is up.
    fn settled(&self) -> bool {
        let count = self.nodes.len();
        self.nodes.iter().all(|node| {
            let state = cluster_info(node.port());
            let replication = info(node.port(), "replication");
            state.contains("cluster_state:ok")
                && state.contains(&format!("cluster_known_nodes:{count}\r"))
                && (replication.contains("role:master")
                    || replication.contains("master_link_status:up"))
        })
    }

    /// `redis://127.0.0.1:<port>` of every node started (killed ones included).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node listening on `port`, to [pause](RedisServer::pause) or
    /// [kill](RedisServer::kill) one by name rather than by the slots it serves.
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// The ports of the nodes still running.
    fn live_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::port)
    }

    /// The port of the node that serves `slot` as master, as the first answering live node
    /// sees it (`CLUSTER SLOTS`).
    pub fn master_of_slot(&self, slot: u16) -> Option<u16> {
        self.live_ports().find_map(|port| {
            let mut conn = connect(port)?;
            let ranges: Vec<redis::Value> =
                redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).ok()?;
            ranges.into_iter().find_map(|range| {
                let redis::Value::Array(fields) = range else {
                    return None;
                };
                let number = |i: usize| match fields.get(i) {
                    Some(redis::Value::Int(n)) => Some(*n),
                    _ => None,
                };
                let (start, end) = (number(0)?, number(1)?);
                if !(start..=end).contains(&i64::from(slot)) {
                    return None;
                }
                let Some(redis::Value::Array(master)) = fields.get(2) else {
                    return None;
                };
                match master.get(1) {
                    Some(redis::Value::Int(port)) => u16::try_from(*port).ok(),
                    _ => None,
                }
            })
        })
    }

    /// `CLUSTER KEYSLOT key`, asked of a live node.
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.live_ports().next().expect("a live node");
        let mut conn = connect(port).expect("a node answers");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT")
    }

    /// Each live node's count of subscribers of `channel` (by port), as the node itself counts
    /// them: `PUBSUB SHARDNUMSUB` (`sharded`: `SSUBSCRIBE`rs, on the master, and replicas, of
    /// the channel's slot) or `PUBSUB NUMSUB` (classic subscribers of that node). Nodes that do
    /// not answer are left out.
    pub fn subscribers(&self, channel: &str, sharded: bool) -> Vec<(u16, i64)> {
        let which = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
        self.live_ports()
            .filter_map(|port| {
                let mut conn = connect(port)?;
                let (_, n): (String, i64) = redis::cmd("PUBSUB")
                    .arg(which)
                    .arg(channel)
                    .query(&mut conn)
                    .ok()?;
                Some((port, n))
            })
            .collect()
    }

    /// Moves `slot`, which must hold no keys, to the master at `to` (what `redis-cli --cluster
    /// reshard` does for an empty slot: importing, migrating, then the new owner on every
    /// master). The old owner drops its shard channels of the slot (`sunsubscribe`).
    pub fn move_empty_slot(&self, slot: u16, to: u16) {
        let from = self.master_of_slot(slot).expect("the slot has a master");
        let id = |port: u16| -> String {
            let mut conn = connect(port).expect("a node answers");
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut conn)
                .expect("CLUSTER MYID")
        };
        let setslot = |port: u16, how: &[&str]| {
            let mut conn = connect(port).expect("a node answers");
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .query(&mut conn)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {how:?} on {port}: {e}"));
        };
        let (from_id, to_id) = (id(from), id(to));
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        setslot(to, &["NODE", &to_id]);
        setslot(from, &["NODE", &to_id]);
        for port in self.live_ports().filter(|p| ![from, to].contains(p)) {
            let master = info(port, "replication").contains("role:master");
            if master {
                setslot(port, &["NODE", &to_id]);
            }
        }
    }

    /// SIGKILL of the master of `slot`; returns its port. Its replica is promoted once the
    /// others have missed it for `cluster-node-timeout` ([`wait_for_master`](Self::wait_for_master)).
    pub fn kill_master_of(&mut self, slot: u16) -> u16 {
        let port = self.master_of_slot(slot).expect("the slot has a master");
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("the master is one of ours");
        node.kill();
        port
    }

    /// Waits until a live node other than `old` serves `slot` as master and every live node
    /// says `cluster_state:ok`; returns the new master's port. Panics after `bound`.
    pub async fn wait_for_master(&self, slot: u16, old: u16, bound: Duration) -> u16 {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(port) = self.master_of_slot(slot).filter(|&p| p != old)
                && self
                    .live_ports()
                    .all(|p| cluster_info(p).contains("cluster_state:ok"))
            {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over slot {slot} within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `CLUSTER INFO` of the node at `port`; empty if it does not answer.
fn cluster_info(port: u16) -> String {
    connect(port)
        .and_then(|mut conn| redis::cmd("CLUSTER").arg("INFO").query(&mut conn).ok())
        .unwrap_or_default()
}
