//! PostgreSQL's own write path beside ours, and the WAL the writes rows start from.
//!
//! - [`reference`]: `pgbench -N` (issue 13's outside reference for writes) with as many
//!   clients as wrk has connections, on the suite's PostgreSQL, for as long as a wrk row; its
//!   p50 and p99 come from pgbench's per-transaction log, so they stand beside the writes row's.
//! - [`warm_wal`]: a fresh cluster creates and zero-fills a new 16 MB WAL segment every few
//!   seconds under writes, holding the WAL write lock while every committer waits (seen as
//!   `IO:WALInitWrite` and `LWLock:WALWrite` in `pg_stat_activity`). A server that has run
//!   for a while reuses the segments its checkpoints recycled instead. The warm-up writes
//!   WAL and checkpoints, so both rows measure that steady state, not a new cluster's first
//!   gigabyte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cascade_core::db::EmbeddedPostgres;
use tokio::process::Command;

use super::report::Row;
use crate::statements::connect;

/// The reference row's name.
pub(super) const PGBENCH: &str = "reference: pgbench -N, same PostgreSQL";

/// The database `pgbench -i` fills (beside the catalog's, on the same server).
const DATABASE: &str = "pgbench";

/// The WAL written since the cluster began, in bytes.
const WAL_BYTES: &str = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint";

/// Writes about `megabytes` of WAL (a table of incompressible-enough rows, created and
/// dropped) and checkpoints, so the next writes reuse recycled segments; what it did, for the
/// notes.
pub(super) async fn warm_wal(pg: &EmbeddedPostgres, megabytes: u64) -> anyhow::Result<String> {
    let (db, _driver) = connect(&pg.pg_config()).await?;
    // Rows of 1,800 bytes stay below TOAST's threshold: stored (and logged) as they are.
    let rows = megabytes * 1024 * 1024 / 1_900;
    let before: i64 = db.query_one(WAL_BYTES, &[]).await?.get(0);
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS cascade_bench_wal; \
         CREATE TABLE cascade_bench_wal AS \
           SELECT g, repeat(md5(g::text), 56) AS pad FROM generate_series(1, {rows}) AS g; \
         DROP TABLE cascade_bench_wal; CHECKPOINT"
    ))
    .await
    .context("writing WAL to warm it")?;
    let after: i64 = db.query_one(WAL_BYTES, &[]).await?.get(0);
    let ready: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_ls_waldir() \
             WHERE name > pg_walfile_name(pg_current_wal_lsn())",
            &[],
        )
        .await?
        .get(0);
    Ok(format!(
        "WAL warmed first: {} MB written and checkpointed, {ready} recycled segments ready",
        (after - before) / (1024 * 1024)
    ))
}

/// `pgbench -N` with `clients` clients for `seconds` on the suite's PostgreSQL (its tables made
/// first in their own database, at `scale`): transactions per second and the latency of each,
/// from pgbench's per-transaction log in `work`.
pub(super) async fn reference(
    pg: &EmbeddedPostgres,
    work: &Path,
    clients: usize,
    seconds: u64,
    scale: u32,
) -> anyhow::Result<Row> {
    let pgbench = binary()?;
    let (db, _driver) = connect(&pg.pg_config()).await?;
    let exists: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&DATABASE],
        )
        .await?
        .get(0);
    if exists == 0 {
        db.batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await?;
    }
    let (socket, port) = socket_of(pg)?;
    let base = |cmd: &mut Command| {
        cmd.arg("-h")
            .arg(&socket)
            .arg("-p")
            .arg(port.to_string())
            .arg("-U")
            .arg("postgres")
            .kill_on_drop(true);
    };
    let mut init = Command::new(&pgbench);
    base(&mut init);
    init.args(["-i", "-q", "-s", &scale.to_string(), DATABASE]);
    run(init, "pgbench -i").await?;
    // Like the writes row, right after a checkpoint (the full-page images start again).
    db.batch_execute("CHECKPOINT").await?;

    let logs = work.join("pgbench");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let mut bench = Command::new(&pgbench);
    base(&mut bench);
    bench
        .args(["-n", "-N", "-M", "prepared", "-l", "--log-prefix"])
        .arg(logs.join("log"))
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
        ])
        .arg(DATABASE);
    let output = run(bench, "pgbench -N").await?;
    let failed = failed_transactions(&output);
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&logs)? {
        let text = std::fs::read_to_string(entry?.path())?;
        latencies.extend(text.lines().filter_map(latency_of));
    }
    if latencies.is_empty() {
        bail!("pgbench -N logged no transaction:\n{output}");
    }
    Ok(Row::from_latencies(
        PGBENCH.to_string(),
        &mut latencies,
        Duration::from_secs(seconds),
        failed,
        format!(
            "the TPC-B-like write without its branch and teller updates (UPDATE, SELECT, INSERT in one transaction, prepared), {clients} clients, scale {scale}; req/s = transactions/s; latency from pgbench's own log"
        ),
    ))
}

/// pgbench beside the embedded server's binaries (Debian keeps it there), or on PATH.
fn binary() -> anyhow::Result<PathBuf> {
    cascade_core::db::find_server_binaries()
        .map(|dir| dir.join("pgbench"))
        .filter(|path| path.is_file())
        .or_else(|| super::which("pgbench"))
        .context("no pgbench: Debian's postgresql package installs it")
}

/// The private socket's directory and port.
fn socket_of(pg: &EmbeddedPostgres) -> anyhow::Result<(PathBuf, u16)> {
    let config = pg.pg_config();
    let socket = config
        .get_hosts()
        .iter()
        .find_map(|host| match host {
            tokio_postgres::config::Host::Unix(path) => Some(path.clone()),
            _ => None,
        })
        .context("the embedded PostgreSQL has no socket directory")?;
    let port = *config.get_ports().first().context("no port")?;
    Ok((socket, port))
}

/// Runs `cmd` to its end; its standard output and error, or why it failed.
async fn run(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("{what} did not start"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{what} failed ({}):\n{text}", output.status);
    }
    Ok(text)
}

/// One line of pgbench's log: `client transaction latency_us script epoch epoch_us`.
fn latency_of(line: &str) -> Option<Duration> {
    let micros: u64 = line.split_whitespace().nth(2)?.parse().ok()?;
    Some(Duration::from_micros(micros))
}

/// pgbench's "number of failed transactions: N (…)" (0 when it does not say).
fn failed_transactions(output: &str) -> u64 {
    output
        .lines()
        .find_map(|line| line.strip_prefix("number of failed transactions: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_log_lines_and_summary() {
        assert_eq!(
            latency_of("3 17 8712 0 1733431234 123456"),
            Some(Duration::from_micros(8712))
        );
        assert_eq!(latency_of("garbage"), None);
        let summary = "transaction type: <builtin: simple update>\n\
                       number of failed transactions: 4 (0.001%)\n";
        assert_eq!(failed_transactions(summary), 4);
        assert_eq!(failed_transactions("tps = 100\n"), 0);
    }
}
