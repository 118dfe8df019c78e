//! `cascade check` on a Redis Cluster: the production review of every node, and the
//! cluster's own health.
//!
//! Through the cluster client a `CONFIG GET` lands on one node, and the others go unchecked;
//! a replica with `noeviction` is found only after its promotion, when it refuses the cache's
//! writes. So the nodes are listed (`CLUSTER NODES`, asked of the first seed that answers),
//! each one is connected to directly and reviewed as a single server is, and the seed's
//! `CLUSTER INFO` and node table say whether every slot is served and every master has a
//! replica to stand in for it. Every connection and command is bounded by the check's
//! deadline and the nodes are asked in parallel, so a dead or stopped node costs one finding
//! and at most one deadline, never a hang.

use std::collections::HashMap;
use std::time::Duration;

use cascade_core::config::{RedisConfig, redact_url};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tokio::task::JoinSet;

use crate::production::{self, Finding, ok, warn};

/// Slots of a Redis Cluster, all of which must be served for every key to be.
const SLOTS: u32 = 16384;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq)]
struct Node {
    id: String,
    /// `host:port` as the cluster announces it; empty host for a node without an address.
    host: String,
    port: u16,
    /// Whether the cluster holds it for a master (else a replica of `master_id`).
    master: bool,
    master_id: Option<String>,
    /// Marked failing: `fail` (agreed by the masters) or `fail?` (pfail: not answering the
    /// node we asked).
    failing: Option<&'static str>,
    /// Slots served (as master); slots being imported or migrated are not counted.
    slots: u32,
}

impl Node {
    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The nodes of a `CLUSTER NODES` reply; lines that do not parse are skipped.
fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let address = fields[1].split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            let flags: Vec<&str> = fields[2].split(',').collect();
            let failing = if flags.contains(&"fail") {
                Some("fail")
            } else if flags.contains(&"fail?") {
                Some("pfail")
            } else {
                None
            };
            let slots = fields[8..]
                .iter()
                .filter(|range| !range.starts_with('['))
                .map(|range| match range.split_once('-') {
                    Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                        (Ok(a), Ok(b)) if b >= a => b - a + 1,
                        _ => 0,
                    },
                    None => u32::from(range.parse::<u32>().is_ok()),
                })
                .sum();
            Some(Node {
                id: fields[0].to_string(),
                host: host.trim_start_matches('[').trim_end_matches(']').into(),
                port: port.parse().ok()?,
                master: flags.contains(&"master"),
                master_id: (fields[3] != "-").then(|| fields[3].to_string()),
                failing,
                slots,
            })
        })
        .collect()
}

/// A field of a `CLUSTER INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `REDIS_CA_CERT`'s roots, if set.
fn root_cert(config: &RedisConfig) -> Result<Option<Vec<u8>>, String> {
    config
        .ca_cert
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|err| format!("REDIS_CA_CERT {}: {err}", path.display()))
        })
        .transpose()
}

/// The client of each seed URL (with `root_cert` for `rediss://` ones).
fn clients(urls: &[&str], root_cert: Option<&[u8]>) -> Result<Vec<redis::Client>, String> {
    urls.iter()
        .map(|url| {
            let info = url
                .into_connection_info()
                .map_err(|err| format!("{}: {err}", redact_url(url)))?;
            node_client(info, root_cert).map_err(|err| format!("{}: {err}", redact_url(url)))
        })
        .collect()
}

fn node_client(
    info: ConnectionInfo,
    root_cert: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    match root_cert {
        // `Redis::new`, which `cascade check` runs first, installed rustls's provider.
        Some(pem) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            )
        }
        _ => redis::Client::open(info),
    }
}

/// `template` (a seed's scheme, credentials and TLS settings) at `node`'s address.
fn at_node(template: &ConnectionInfo, node: &Node) -> ConnectionInfo {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
    };
    template.clone().set_addr(addr)
}

/// Runs `work` on a fresh connection of `client`, the whole of it under `deadline`.
async fn on_node<T, F>(client: redis::Client, deadline: Duration, work: F) -> Result<T, String>
where
    F: AsyncFnOnce(&mut redis::aio::MultiplexedConnection) -> redis::RedisResult<T>,
{
    let bounded = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(deadline))
        .set_response_timeout(Some(deadline));
    let run = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&bounded)
            .await?;
        work(&mut conn).await
    };
    let silent = || format!("no answer within {deadline:?}");
    match tokio::time::timeout(deadline, run).await {
        Ok(Err(err)) if err.is_timeout() => Err(silent()),
        Ok(result) => result.map_err(|err| err.to_string()),
        Err(_) => Err(silent()),
    }
}

/// What a seed says of the cluster: its node table and `CLUSTER INFO`.
struct View {
    nodes: Vec<Node>,
    info: String,
    /// The seed's connection settings, for the other nodes.
    template: ConnectionInfo,
    root_cert: Option<Vec<u8>>,
}

/// Asks every seed at once; the first to answer gives the view.
async fn discover(config: &RedisConfig, deadline: Duration) -> Result<View, String> {
    let cluster = config.cluster.as_ref().ok_or("not a Redis Cluster")?;
    let urls: Vec<&str> = cluster.urls.iter().map(|url| url.expose()).collect();
    let root_cert = root_cert(config)?;
    let clients = clients(&urls, root_cert.as_deref())?;
    let mut asks = JoinSet::new();
    for (client, url) in clients.into_iter().zip(&urls) {
        let shown = redact_url(url);
        asks.spawn(async move {
            let template = client.get_connection_info().clone();
            let answer = on_node(client, deadline, async |conn| {
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
                let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(conn).await?;
                Ok((nodes, info))
            })
            .await;
            answer
                .map(|(nodes, info)| (nodes, info, template))
                .map_err(|err| format!("{shown}: {err}"))
        });
    }
    let mut refused = Vec::new();
    while let Some(joined) = asks.join_next().await {
        match joined.map_err(|err| err.to_string()).and_then(|r| r) {
            Ok((nodes, info, template)) => {
                return Ok(View {
                    nodes: parse_nodes(&nodes),
                    info,
                    template,
                    root_cert,
                });
            }
            Err(err) => refused.push(err),
        }
    }
    Err(refused.join("; "))
}

/// `host:port (master)` or `host:port (replica of host:port)`, as findings name a node.
fn describe(node: &Node, nodes: &[Node]) -> String {
    let role = if node.master {
        "master".to_string()
    } else {
        let of = node
            .master_id
            .as_ref()
            .and_then(|id| nodes.iter().find(|n| &n.id == id))
            .map(Node::addr)
            .unwrap_or_else(|| "an unknown master".into());
        format!("replica of {of}")
    };
    format!("{} ({role})", node.addr())
}

/// The cluster's health as the seed sees it: its state, its slots, failing nodes, masters
/// without a replica.
fn health(view: &View) -> Vec<Finding> {
    let mut findings = Vec::new();
    let nodes = &view.nodes;
    let state = info_field(&view.info, "cluster_state").unwrap_or("?");
    findings.push(if state == "ok" {
        ok("cluster state", "ok: every slot is served")
    } else {
        warn(
            "cluster state",
            format!(
                "{state}: some slots have no master that answers; the cache misses (and \
                 reads fall through to PostgreSQL) for the keys in them"
            ),
        )
    });
    let count = |name: &str| -> u32 {
        info_field(&view.info, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (assigned, slots_ok) = (count("cluster_slots_assigned"), count("cluster_slots_ok"));
    findings.push(if assigned == SLOTS && slots_ok == SLOTS {
        ok("cluster slots", format!("all {SLOTS} assigned and served"))
    } else {
        warn(
            "cluster slots",
            format!(
                "{assigned} of {SLOTS} assigned, {slots_ok} served ({} pfail, {} fail): keys \
                 in the others cannot be cached; assign them (redis-cli --cluster fix)",
                count("cluster_slots_pfail"),
                count("cluster_slots_fail")
            ),
        )
    });
    let mut failing = false;
    for node in nodes {
        if let Some(mark) = node.failing {
            failing = true;
            findings.push(warn(
                "cluster node",
                format!(
                    "{} is marked {mark} by the cluster: it does not answer the others{}",
                    describe(node, nodes),
                    if node.master && node.slots > 0 {
                        "; its slots are unserved until a replica is promoted"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    if !failing {
        let masters = nodes.iter().filter(|n| n.master).count();
        findings.push(ok(
            "cluster node",
            format!(
                "{} nodes ({masters} masters, {} replicas), none marked failing",
                nodes.len(),
                nodes.len() - masters
            ),
        ));
    }
    let mut alone = false;
    for master in nodes
        .iter()
        .filter(|n| n.master && n.slots > 0 && n.failing.is_none())
    {
        let replicas = nodes
            .iter()
            .filter(|n| n.master_id.as_ref() == Some(&master.id) && n.failing.is_none())
            .count();
        if replicas == 0 {
            alone = true;
            findings.push(warn(
                "cluster replicas",
                format!(
                    "{} serves {} slots and has no replica: if it dies, its slots are lost \
                     until it comes back; add one (redis-cli --cluster add-node --cluster-slave)",
                    describe(master, nodes),
                    master.slots
                ),
            ));
        }
    }
    if !alone {
        findings.push(ok(
            "cluster replicas",
            "every master has a replica to promote if it dies",
        ));
    }
    findings
}

/// The settings a node is reviewed on: the single server's, and whether it stops serving
/// when any slot is unserved.
async fn review_node(client: redis::Client, deadline: Duration) -> Result<Vec<Finding>, String> {
    on_node(client, deadline, async |conn| {
        let mut pipe = redis::pipe();
        for name in production::REDIS_SETTINGS {
            pipe.cmd("CONFIG").arg("GET").arg(name);
        }
        pipe.cmd("CONFIG")
            .arg("GET")
            .arg("cluster-require-full-coverage");
        let pairs: Vec<HashMap<String, String>> = pipe.query_async(conn).await?;
        let settings: HashMap<String, String> = pairs.into_iter().flatten().collect();
        let mut findings = production::redis_settings(&settings);
        findings.push(
            match settings
                .get("cluster-require-full-coverage")
                .map(String::as_str)
            {
                Some("yes") => warn(
                    "full coverage",
                    "cluster-require-full-coverage yes: while one master is down and its \
                     slots unserved, this node refuses every command, so the whole cache stops \
                     instead of a share of it; set no (docs/deploy.md)",
                ),
                other => ok(
                    "full coverage",
                    format!(
                        "cluster-require-full-coverage {}: the other slots keep serving while \
                         one master is down",
                        other.unwrap_or("?")
                    ),
                ),
            },
        );
        Ok(findings)
    })
    .await
}

/// The review of a Redis Cluster (`REDIS_CLUSTER_URLS`): its health, then each node's
/// settings, masters first, each finding naming its node.
pub async fn review(config: &RedisConfig, deadline: Duration) -> Vec<Finding> {
    let view = match discover(config, deadline).await {
        Ok(view) => view,
        Err(why) => {
            return vec![warn(
                "cluster nodes",
                format!("no seed node answered CLUSTER NODES, nothing reviewed: {why}"),
            )];
        }
    };
    let mut findings = health(&view);
    let mut nodes = view.nodes.clone();
    nodes.sort_by_key(|n| (!n.master, n.addr()));
    let mut asks = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let name = describe(node, &view.nodes);
        if node.host.is_empty() {
            asks.spawn(async move { (i, name, Err("the cluster knows no address for it".into())) });
            continue;
        }
        let client = node_client(at_node(&view.template, node), view.root_cert.as_deref());
        asks.spawn(async move {
            let reviewed = match client {
                Ok(client) => review_node(client, deadline).await,
                Err(err) => Err(err.to_string()),
            };
            (i, name, reviewed)
        });
    }
    let mut reviewed: Vec<_> = asks.join_all().await;
    reviewed.sort_by_key(|(i, _, _)| *i);
    for (_, name, result) in reviewed {
        match result {
            Ok(node_findings) => findings.extend(node_findings.into_iter().map(|f| Finding {
                detail: format!("{name}: {}", f.detail),
                ..f
            })),
            Err(why) => findings.push(warn(
                "redis node",
                format!("{name}: {why}; its settings are not reviewed"),
            )),
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922 [10923->-b3]
a3 127.0.0.1:7002@17002,cache-3 master,fail - 0 0 3 disconnected 10923-16383
b1 127.0.0.1:7003@17003 slave a1 0 0 1 connected
b2 127.0.0.1:7004@17004 slave,fail? a2 0 0 2 connected
b3 127.0.0.1:7005@17005 master - 0 0 4 connected 7
";

    #[test]
    fn cluster_nodes_lines_give_roles_slots_and_failures() {
        let nodes = parse_nodes(NODES);
        assert_eq!(nodes.len(), 6);
        assert_eq!(nodes[0].slots, 5461);
        assert_eq!(nodes[1].slots, 5462, "a migrating range is not counted");
        assert_eq!(nodes[2].failing, Some("fail"));
        assert_eq!(nodes[2].addr(), "127.0.0.1:7002");
        assert_eq!(nodes[4].failing, Some("pfail"));
        assert_eq!(nodes[4].master_id.as_deref(), Some("a2"));
        assert_eq!(nodes[5].slots, 1);
        assert_eq!(
            describe(&nodes[3], &nodes),
            "127.0.0.1:7003 (replica of 127.0.0.1:7000)"
        );
    }

    #[test]
    fn masters_without_a_working_replica_and_failing_nodes_are_flagged() {
        let view = View {
            nodes: parse_nodes(NODES),
            info:
                "cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\n"
                    .into(),
            template: "redis://127.0.0.1:7000".into_connection_info().unwrap(),
            root_cert: None,
        };
        let findings = health(&view);
        let warned = |name: &str| -> Vec<&str> {
            findings
                .iter()
                .filter(|f| !f.ok && f.name == name)
                .map(|f| f.detail.as_str())
                .collect()
        };
        assert_eq!(warned("cluster state").len(), 1);
        assert!(warned("cluster slots")[0].starts_with("16384 of 16384 assigned, 10923 served"));
        let failing = warned("cluster node");
        assert_eq!(failing.len(), 2, "{failing:?}");
        assert!(failing[0].starts_with("127.0.0.1:7002 (master) is marked fail"));
        assert!(
            failing[1].starts_with("127.0.0.1:7004 (replica of 127.0.0.1:7001) is marked pfail")
        );
        // a2's one replica is failing, b3 never had one; a3 is down itself.
        let alone = warned("cluster replicas");
        assert_eq!(alone.len(), 2, "{alone:?}");
        assert!(alone[0].starts_with("127.0.0.1:7001 (master) serves 5462 slots"));
        assert!(alone[1].starts_with("127.0.0.1:7005 (master) serves 1 slots"));
    }
}
