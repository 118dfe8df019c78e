//! `cascade check` on a real Redis Cluster (3 masters, 3 replicas): every node's settings
//! are reviewed and named, the cluster's own health is reported, and a stopped or killed node
//! is a finding within the check's bound, not a hang.

use std::time::{Duration, Instant};

use cascade_testkit::{PgServer, RedisCluster};

use crate::common::{self, check_output};

/// The production review's lines named `name` (`  [ok  ] maxmemory …`).
fn review<'a>(stdout: &'a str, name: &str) -> Vec<&'a str> {
    let review = stdout
        .split("production review")
        .nth(1)
        .unwrap_or_else(|| panic!("no production review in:\n{stdout}"));
    review
        .lines()
        .filter(|l| {
            l.get(9..)
                .is_some_and(|rest| rest.starts_with(&format!("{name} ")))
        })
        .collect()
}

/// The one line named `name` that names the node at `port`.
fn about<'a>(stdout: &'a str, name: &str, port: u16) -> &'a str {
    let node = format!("127.0.0.1:{port} (");
    let lines: Vec<&str> = review(stdout, name)
        .into_iter()
        .filter(|l| l.contains(&node))
        .collect();
    assert_eq!(lines.len(), 1, "{name} of {port}:\n{stdout}");
    lines[0]
}

async fn config_set(port: u16, pairs: &[(&str, &str)]) {
    config_set_as("", port, pairs).await;
}

/// [`config_set`] with `auth` (`:password@`) in the URL.
async fn config_set_as(auth: &str, port: u16, pairs: &[(&str, &str)]) {
    common::config_set(&format!("redis://{auth}127.0.0.1:{port}"), pairs).await;
}

/// Whether the node at `port` is a replica (`ROLE`).
async fn is_replica(port: u16) -> bool {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("node answers");
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .expect("ROLE");
    role.first() == Some(&redis::Value::BulkString(b"slave".to_vec()))
}

fn ports(cluster: &RedisCluster) -> Vec<u16> {
    cluster
        .urls()
        .iter()
        .map(|u| u.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

async fn env(pg: &PgServer, cluster: &RedisCluster) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", pg.fresh_database().await),
        ("REDIS_CLUSTER_URLS", cluster.urls().join(",")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reviews_every_node_of_a_redis_cluster_and_names_the_misconfigured_one() {
    let pg = PgServer::start().await;
    let cluster = RedisCluster::start(3, 1).await;
    let ports = ports(&cluster);
    for &port in &ports {
        config_set(
            port,
            &[("maxmemory", "64mb"), ("maxmemory-policy", "allkeys-lru")],
        )
        .await;
    }
    let env = env(&pg, &cluster).await;

    // Set as docs/deploy.md says, on every node: each of the 6 has its own ok findings, and
    // the cluster's health is ok.
    let (code, stdout) = check_output(&env, &[]);
    assert_eq!(code, Some(0), "{stdout}");
    for &port in &ports {
        for name in ["maxmemory", "eviction", "persistence", "full coverage"] {
            let line = about(&stdout, name, port);
            assert!(line.contains("[ok  ]"), "{line}\n{stdout}");
        }
    }
    assert_eq!(review(&stdout, "maxmemory").len(), 6, "{stdout}");
    for name in [
        "cluster state",
        "cluster slots",
        "cluster node",
        "cluster replicas",
    ] {
        let lines = review(&stdout, name);
        assert!(
            lines.len() == 1 && lines[0].contains("[ok  ]"),
            "{name}:\n{stdout}"
        );
    }
    assert!(review(&stdout, "cluster node")[0].contains("6 nodes (3 masters, 3 replicas)"));

    // One replica refuses writes when full, one master stops serving when any slot is down:
    // each is flagged by name and role, the other nodes stay ok.
    let mut replicas = Vec::new();
    for &port in &ports {
        if is_replica(port).await {
            replicas.push(port);
        }
    }
    assert_eq!(replicas.len(), 3);
    let bad_replica = replicas[1];
    let master = *ports.iter().find(|p| !replicas.contains(p)).unwrap();
    config_set(bad_replica, &[("maxmemory-policy", "noeviction")]).await;
    config_set(master, &[("cluster-require-full-coverage", "yes")]).await;
    let (code, stdout) = check_output(&env, &[]);
    assert_eq!(code, Some(0), "warnings do not fail the check:\n{stdout}");
    let flagged = about(&stdout, "eviction", bad_replica);
    assert!(
        flagged.contains("[warn]") && flagged.contains("(replica of 127.0.0.1:"),
        "{flagged}"
    );
    assert!(flagged.contains("noeviction"), "{flagged}");
    let coverage = about(&stdout, "full coverage", master);
    assert!(
        coverage.contains("[warn]") && coverage.contains("(master)"),
        "{coverage}"
    );
    for &port in ports.iter().filter(|&&p| p != bad_replica) {
        assert!(
            about(&stdout, "eviction", port).contains("[ok  ]"),
            "{stdout}"
        );
    }
    for &port in ports.iter().filter(|&&p| p != master) {
        assert!(
            about(&stdout, "full coverage", port).contains("[ok  ]"),
            "{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_a_cluster_names_a_stopped_or_killed_node_and_still_ends_in_time() {
    let pg = PgServer::start().await;
    let mut cluster = RedisCluster::start(3, 1).await;
    let ports = ports(&cluster);
    let env = env(&pg, &cluster).await;

    // A replica stopped (SIGSTOP): its connection opens and nothing answers. The check says
    // so, naming it, within its deadline. Every node takes a password, so the nodes beyond
    // the seeds are reached with the seeds' credentials; a first seed never answers (port 1:
    // nothing listens, and no self-connect as on an ephemeral port). The password is never
    // printed.
    let mut stopped = None;
    for &port in &ports {
        if is_replica(port).await {
            stopped = Some(port);
            break;
        }
    }
    let stopped = stopped.expect("a replica");
    let seeds = std::iter::once(1)
        .chain(ports[..2].iter().copied())
        .map(|port| format!("redis://:s3cret-pw@127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let with_password = [env[0].clone(), ("REDIS_CLUSTER_URLS", seeds)];
    for &port in &ports {
        config_set(
            port,
            &[("masterauth", "s3cret-pw"), ("requirepass", "s3cret-pw")],
        )
        .await;
    }
    cluster.node_mut(stopped).pause();
    let started = Instant::now();
    let (_, stdout) = check_output(&with_password, &[]);
    let took = started.elapsed();
    cluster.node_mut(stopped).resume();
    for &port in &ports {
        config_set_as(":s3cret-pw@", port, &[("requirepass", "")]).await;
    }
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{stdout}");
    let line = about(&stdout, "redis node", stopped);
    assert!(
        line.contains("[warn]") && line.contains("replica of") && line.contains("no answer within"),
        "{line}\n{stdout}"
    );
    for &port in ports.iter().filter(|&&p| p != stopped) {
        assert!(
            about(&stdout, "eviction", port).contains("[warn]"),
            "{stdout}"
        );
    }
    assert!(!stdout.contains("s3cret-pw"), "{stdout}");

    // A master killed: once its replica took over, the check still passes, and says the dead
    // node is failed, cannot be reviewed, and the promoted master has no replica left.
    let slot = 0;
    let killed = cluster.kill_master_of(slot);
    let promoted = cluster
        .wait_for_master(slot, killed, Duration::from_secs(30))
        .await;
    let started = Instant::now();
    let (code, stdout) = check_output(&env, &[]);
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{stdout}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{stdout}");
    let unreachable = about(&stdout, "redis node", killed);
    assert!(unreachable.contains("[warn]"), "{unreachable}");
    let failed = about(&stdout, "cluster node", killed);
    assert!(
        failed.contains("[warn]") && failed.contains("is marked fail"),
        "{failed}\n{stdout}"
    );
    let alone = about(&stdout, "cluster replicas", promoted);
    assert!(
        alone.contains("[warn]") && alone.contains("(master)") && alone.contains("no replica"),
        "{alone}\n{stdout}"
    );
    assert!(
        about(&stdout, "eviction", promoted).contains("(master)"),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret-pw"), "{stdout}");
}
