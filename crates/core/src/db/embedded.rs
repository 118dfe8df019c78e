//! A private PostgreSQL for when no `DATABASE_URL` is configured.
//!
//! It is started from the server binaries installed on the machine (`initdb`, `pg_ctl`) in a
//! data directory that is reused from run to run, listens on a Unix socket inside that
//! directory only (no TCP port to collide with, nothing reachable from the network), and is
//! stopped when Cascade exits. PostgreSQL refuses to run as root, so when we are root the
//! binaries run as the `postgres` system user, which owns the directory.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio_postgres::NoTls;

use super::DbError;

/// The database Cascade uses inside the embedded cluster.
const DATABASE: &str = "cascade";
/// Only names the socket file (`.s.PGSQL.5432`); nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;

/// A running private PostgreSQL; stopped by [`EmbeddedPostgres::stop`] or on drop.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    running: bool,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: first PATH, then the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian keeps the server binaries off PATH).
pub fn find_server_binaries() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_all(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry
                .file_name()
                .to_str()?
                .split('.')
                .next()?
                .parse()
                .ok()?;
            let bin = entry.path().join("bin");
            has_all(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `(uid, gid)` of a system user, read from /etc/passwd.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

impl EmbeddedPostgres {
    /// Initialises the cluster on first use, starts it (or adopts one already running from
    /// a previous run that did not stop it), and makes sure the `cascade` database exists.
    pub async fn start(data_dir: &Path, timeout: Duration) -> Result<Self, DbError> {
        let bin = find_server_binaries().ok_or_else(|| {
            DbError::Embedded(
                "no DATABASE_URL is set and no PostgreSQL server binaries were found (looked for \
                 initdb, pg_ctl and postgres in PATH and /usr/lib/postgresql/*/bin). Install them \
                 with `apt-get install -y postgresql`, or set DATABASE_URL to a running server."
                    .into(),
            )
        })?;
        let root = std::path::absolute(data_dir).map_err(|e| {
            DbError::Embedded(format!("data directory {}: {e}", data_dir.display()))
        })?;
        let cluster = root.join("pg");
        let data = cluster.join("data");
        let socket_dir = cluster.join("run");
        let run_as = if running_as_root() {
            Some(system_user("postgres").ok_or_else(|| {
                DbError::Embedded(
                    "running as root, and PostgreSQL refuses to; no `postgres` system user exists \
                     to run it as (apt-get install -y postgresql creates one)"
                        .into(),
                )
            })?)
        } else {
            None
        };

        for dir in [&cluster, &socket_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| DbError::Embedded(format!("cannot create {}: {e}", dir.display())))?;
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
                    DbError::Embedded(format!("cannot chown {}: {e}", dir.display()))
                })?;
            }
        }

        let mut pg = EmbeddedPostgres {
            bin,
            data,
            socket_dir,
            run_as,
            running: false,
        };
        if !pg.data.join("PG_VERSION").exists() {
            tracing::info!(dir = %pg.data.display(), "initialising the embedded PostgreSQL cluster");
            let data_arg = pg.data.display().to_string();
            pg.run(
                "initdb",
                &[
                    "-D",
                    &data_arg,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
            )?;
        }

        if pg
            .run("pg_ctl", &["status", "-D", &pg.data.display().to_string()])
            .is_ok()
        {
            tracing::info!(dir = %pg.data.display(), "adopting the embedded PostgreSQL left running by a previous run");
        } else {
            let log = cluster.join("postgres.log");
            let options = format!(
                "-c listen_addresses='' -k '{}' -p {SOCKET_PORT}",
                pg.socket_dir.display()
            );
            let secs = timeout.as_secs().max(5).to_string();
            pg.run(
                "pg_ctl",
                &[
                    "start",
                    "-w",
                    "-t",
                    &secs,
                    "-D",
                    &pg.data.display().to_string(),
                    "-l",
                    &log.display().to_string(),
                    "-o",
                    &options,
                ],
            )
            .map_err(|e| DbError::Embedded(format!("{e}; see {}", log.display())))?;
            tracing::info!(socket = %pg.socket_dir.display(), "embedded PostgreSQL started");
        }
        pg.running = true;
        pg.ensure_database().await?;
        Ok(pg)
    }

    /// Connection settings for the `cascade` database over the private socket.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(SOCKET_PORT)
            .user("postgres")
            .dbname(DATABASE);
        config
    }

    /// A `DATABASE_URL` for the `cascade` database over the private socket, for child
    /// processes (the benchmark's server).
    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres@localhost/{DATABASE}?host={}&port={SOCKET_PORT}",
            self.socket_dir.display()
        )
    }

    /// How errors and health output name this server.
    pub fn address(&self) -> String {
        format!("{}/.s.PGSQL.{SOCKET_PORT}", self.socket_dir.display())
    }

    async fn ensure_database(&self) -> Result<(), DbError> {
        let mut admin = self.pg_config();
        admin
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = admin.connect(NoTls).await?;
        let driver = tokio::spawn(connection);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
            .await?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                .await?;
        }
        drop(client);
        let _ = driver.await;
        Ok(())
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<Output, DbError> {
        let mut command = Command::new(self.bin.join(program));
        command.args(args).stdin(Stdio::null()).current_dir("/");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let output = command
            .output()
            .map_err(|e| DbError::Embedded(format!("cannot run {program}: {e}")))?;
        if output.status.success() {
            Ok(output)
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            Err(DbError::Embedded(format!(
                "{program} failed ({}): {}",
                output.status,
                format!("{stderr} {stdout}").trim()
            )))
        }
    }

    /// Stops the server ("fast": open sessions are ended, committed data is safe).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let data = self.data.display().to_string();
        match self.run("pg_ctl", &["stop", "-m", "fast", "-w", "-D", &data]) {
            Ok(_) => tracing::info!("embedded PostgreSQL stopped"),
            Err(err) => tracing::warn!(error = %err, "could not stop the embedded PostgreSQL"),
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}
