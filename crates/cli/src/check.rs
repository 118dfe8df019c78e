//! `cascade check`: the configuration doctor. Prints the effective configuration, then checks
//! each dependency under a deadline. Exit 0 only when the required ones answer: PostgreSQL
//! always, Redis when REDIS_URL is set, and each replica of DATABASE_REPLICA_URLS (which
//! must also be a streaming replica of the primary's cluster; one too far behind is a
//! warning: `replicas.rs`). On a Redis Cluster every node is reviewed, and the cluster's
//! health too (`redis_cluster.rs`). The Venice API is reported but optional: Cascade serves stale or
//! degraded upstream data when it is down.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cascade_core::config::{Config, DatabaseConfig, DatabaseSource};
use cascade_core::db::{Conn, Db, cluster_dir, error_chain, find_server_binaries};
use cascade_core::redis::Redis;
use cascade_server::Settings;

use crate::production::{self, Finding};
use crate::redis_cluster;
use crate::replicas;

const DEADLINE: Duration = Duration::from_secs(5);

/// One pool connection, `SELECT version()` and the production review of its settings, all
/// under a deadline.
async fn probe_postgres(
    config: &DatabaseConfig,
    deadline: Duration,
    instances: u32,
) -> Result<(String, Vec<Finding>), String> {
    let (db, conn) = connect(config, &config.source, deadline).await?;
    let work = async {
        let row = conn
            .query_one("SELECT version()", &[])
            .await
            .map_err(|e| e.to_string())?;
        let mut findings = production::postgres(&conn, config.pool_max, instances)
            .await
            .map_err(|e| e.to_string())?;
        if db.pooler() == cascade_core::db::Pooler::PgBouncer {
            let timeout: String = conn
                .query_one("SELECT current_setting('statement_timeout')", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            findings.push(production::pooled_statement_timeout(&timeout));
        }
        Ok((row.get::<_, String>(0), findings))
    };
    let probed = tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))
        .and_then(|r| r);
    drop(conn);
    db.close();
    probed
}

/// Opens one connection to `source` with `database`'s pool settings, within `deadline`.
pub(crate) async fn connect(
    database: &DatabaseConfig,
    source: &DatabaseSource,
    deadline: Duration,
) -> Result<(Db, Conn), String> {
    let DatabaseSource::External {
        config: pg,
        address,
        ..
    } = source
    else {
        return Err("not an external database".into());
    };
    let mut pg = (**pg).clone();
    pg.connect_timeout(deadline);
    let settings = DatabaseConfig {
        source: source.clone(),
        pool_min: 0,
        pool_max: 1,
        startup_timeout: deadline,
        ..database.clone()
    };
    let connected = async {
        let db = Db::connect(&settings, pg, address.clone())
            .await
            .map_err(|e| e.to_string())?;
        let conn = db.conn().await.map_err(|e| e.to_string())?;
        Ok((db, conn))
    };
    tokio::time::timeout(deadline * 2, connected)
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))?
}

fn line(ok: bool, required: bool, name: &str, detail: &str) {
    let mark = match (ok, required) {
        (true, _) => "ok  ",
        (false, true) => "FAIL",
        (false, false) => "warn",
    };
    println!("  [{mark}] {name:<20} {detail}");
}

/// `instances`: how many instances will share the database (their pools must fit in its
/// `max_connections`).
pub async fn run(settings: &Settings, instances: u32) -> anyhow::Result<ExitCode> {
    crate::print_config(settings);
    let config = &settings.core;
    println!();
    println!("checks:");
    let mut healthy = true;
    let mut review = production::tls(&config.database, config.redis.as_ref());

    match &config.database.source {
        DatabaseSource::External { address, .. } => {
            let started = Instant::now();
            match probe_postgres(&config.database, DEADLINE, instances).await {
                Ok((version, findings)) => {
                    line(
                        true,
                        true,
                        "postgresql",
                        &format!(
                            "{address} answered in {} ms: {version}",
                            started.elapsed().as_millis()
                        ),
                    );
                    review.extend(findings);
                }
                Err(err) => {
                    healthy = false;
                    line(false, true, "postgresql", &format!("{address}: {err}"));
                }
            }
        }
        DatabaseSource::Embedded { data_dir } => match find_server_binaries() {
            Some(bin) => {
                let cluster = cluster_dir(data_dir).unwrap_or_else(|_| data_dir.join("pg"));
                line(
                    true,
                    true,
                    "postgresql",
                    &format!(
                        "embedded: server binaries in {}, cluster in {} ({})",
                        bin.display(),
                        cluster.display(),
                        if cluster.join("data/PG_VERSION").exists() {
                            "initialised"
                        } else {
                            "created on first serve"
                        }
                    ),
                )
            }
            None => {
                healthy = false;
                line(
                    false,
                    true,
                    "postgresql",
                    "no DATABASE_URL and no PostgreSQL server binaries: apt-get install -y postgresql, or set DATABASE_URL",
                );
            }
        },
    }

    if matches!(config.database.source, DatabaseSource::External { .. }) {
        for verdict in replicas::check(&config.database, &config.replicas, DEADLINE).await {
            healthy &= !verdict.fails;
            line(verdict.ok, verdict.fails, &verdict.name, &verdict.detail);
        }
    }

    match &config.redis {
        Some(redis_config) => {
            let redis = Redis::new(redis_config)?;
            let health = tokio::time::timeout(DEADLINE, redis.health()).await;
            match health {
                Ok(h) if h.up => {
                    line(
                        true,
                        true,
                        "redis",
                        &format!(
                            "{}{} answered PING in {:.1} ms",
                            redis.display(),
                            redis
                                .sentinel_master()
                                .map(|at| format!(" (resolved: {at})"))
                                .unwrap_or_default(),
                            h.latency_ms
                        ),
                    );
                    if redis_config.cluster.is_none() {
                        review.extend(production::redis(&redis).await);
                    }
                }
                Ok(h) => {
                    healthy = false;
                    line(
                        false,
                        true,
                        "redis",
                        &format!("{}: {}", redis.display(), h.error.unwrap_or_default()),
                    );
                }
                Err(_) => {
                    healthy = false;
                    line(
                        false,
                        true,
                        "redis",
                        &format!("{}: no answer within {DEADLINE:?}", redis.display()),
                    );
                }
            }
            // A cluster's nodes are reviewed each, whether or not the cluster answered as a
            // whole: a down cluster's findings say which node and which slots.
            if redis_config.cluster.is_some() {
                review.extend(redis_cluster::review(redis_config, DEADLINE).await);
            }
        }
        None => line(
            true,
            false,
            "redis",
            "not configured: in-process cache tier only",
        ),
    }

    match cascade_app::probe_venice(&settings.app, DEADLINE).await {
        Ok(answer) => line(true, false, "venice", &answer),
        Err(why) => line(false, false, "venice", &format!("{why} (optional)")),
    }

    println!();
    println!("production review (warnings do not fail the check):");
    for finding in &review {
        line(finding.ok, false, finding.name, &finding.detail);
    }

    println!();
    if healthy {
        println!("all required dependencies answer");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("a required dependency does not answer");
        Ok(ExitCode::FAILURE)
    }
}

/// `cascade cache stats`: the `cache` section of a running server's `/health/db`, as a table.
/// `/health/db` is for operators: the request carries the configured `ADMIN_TOKEN`.
pub async fn cache_stats(config: &Config, url: Option<String>) -> anyhow::Result<ExitCode> {
    let base = url.unwrap_or_else(|| format!("http://{}:{}", config.http.host, config.http.port));
    let Some(token) = &config.http.admin_token else {
        anyhow::bail!(
            "ADMIN_TOKEN is not set: the server's /health/db answers only its admin token; set \
             ADMIN_TOKEN to the value the server was started with"
        );
    };
    let client = cascade_core::upstream::http_client(DEADLINE, DEADLINE)?;
    let response = client
        .get(format!("{}/health/db", base.trim_end_matches('/')))
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{base} does not answer: {}", error_chain(&e)))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if status == 401 || status == 403 {
        anyhow::bail!(
            "{base} refused the admin token ({status}): {}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
        );
    }
    let cache = &body["cache"];
    println!(
        "backend {}  breaker {}",
        cache["backend"].as_str().unwrap_or("?"),
        cache["breaker"].as_str().unwrap_or("?")
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>8} {:>10} {:>12} {:>8}",
        "namespace", "near hits", "shared", "misses", "loads", "lease wait", "invalidated", "hit %"
    );
    for ns in cache["namespaces"].as_array().into_iter().flatten() {
        let n = |k: &str| ns[k].as_u64().unwrap_or(0);
        println!(
            "{:<12} {:>10} {:>10} {:>10} {:>8} {:>10} {:>12} {:>7.1}%",
            ns["namespace"].as_str().unwrap_or("?"),
            n("near_hits"),
            n("shared_hits"),
            n("misses"),
            n("loads"),
            n("lease_waits"),
            n("invalidations"),
            ns["hit_ratio"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
