//! A private PostgreSQL for when no `DATABASE_URL` is configured.
//!
//! It is started from the server binaries installed on the machine (`initdb`, `pg_ctl`) in a
//! data directory that is reused from run to run, listens on a Unix socket inside that
//! directory only (no TCP port to collide with, nothing reachable from the network), and is
//! stopped when Cascade exits. PostgreSQL refuses to run as root, so when we are root the
//! binaries run as the `postgres` system user, which owns the directory.
//!
//! That user must be able to reach the directory. A clone under `/root` (mode 700, the usual
//! place for root) is closed to it, and `initdb` fails with "could not access directory".
//! Then the cluster goes to [`RELOCATED_ROOT`]`/<hash of the absolute data directory>`
//! instead (created for `postgres`, mode 700), the log says where, and every later run from
//! the same data directory finds it there again ([`cluster_dir`]).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_postgres::NoTls;

use super::DbError;

/// The database Cascade uses inside the embedded cluster.
const DATABASE: &str = "cascade";
/// Only names the socket file (`.s.PGSQL.5432`); nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;
/// Where clusters go whose data directory the `postgres` user cannot reach (when we run as
/// root): the FHS place for a program's state, outside every home directory.
pub const RELOCATED_ROOT: &str = "/var/lib/cascade";

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

/// The cluster's directory for the data directory `data_dir`: `<data_dir>/pg`, or when we run
/// as root and the `postgres` user cannot reach it, [`RELOCATED_ROOT`]`/<hash>` where the hash
/// is of the absolute data directory (so each project keeps its own cluster, and finds it
/// again on the next run). `cascade check` shows the same answer.
pub fn cluster_dir(data_dir: &Path) -> std::io::Result<PathBuf> {
    locate(data_dir).map(|(dir, _)| dir)
}

/// [`cluster_dir`], and whether it was relocated.
fn locate(data_dir: &Path) -> std::io::Result<(PathBuf, bool)> {
    // `components` drops `.` and doubled slashes: `./.cascade` and `.cascade` are one project.
    let root: PathBuf = std::path::absolute(data_dir)?.components().collect();
    let in_place = root.join("pg");
    if !running_as_root() {
        return Ok((in_place, false));
    }
    match system_user("postgres") {
        Some(user) if !reachable_by(user, &in_place) => Ok((relocated(&root), true)),
        _ => Ok((in_place, false)),
    }
}

/// `RELOCATED_ROOT/<first 16 bytes of SHA-256 of the absolute data directory, in hex>`.
fn relocated(root: &Path) -> PathBuf {
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(RELOCATED_ROOT).join(hash)
}

/// Whether `user` can reach `path`: asked of the kernel, by running `test -x` as that user on
/// the nearest directory that exists (what [`prepare_dir`] creates below it is mode 755 and
/// the cluster's own directory is handed to the user), with exactly the permissions `initdb`
/// will run with.
fn reachable_by((uid, gid): (u32, u32), path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    Command::new("test")
        .arg("-x")
        .arg(existing)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .uid(uid)
        .gid(gid)
        .status()
        // No `test` to ask: keep the directory as configured, as before this check existed.
        .map_or(true, |status| status.success())
}

/// Creates `dir` and its missing parents, each with mode 755 whatever the umask (under a
/// umask of 077 they would be closed to the `postgres` user), hands `dir` to `owner` when
/// there is one, and makes it mode 700 when `private`.
fn prepare_dir(dir: &Path, owner: Option<(u32, u32)>, private: bool) -> Result<(), DbError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |what: &str, path: &Path, e: std::io::Error| {
        DbError::Embedded(format!("cannot {what} {}: {e}", path.display()))
    };
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.exists()).collect();
    for path in missing.into_iter().rev() {
        match std::fs::create_dir(path) {
            Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| failed("chmod", path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed("create", path, e)),
        }
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| failed("chown", dir, e))?;
    }
    if private {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| failed("chmod", dir, e))?;
    }
    Ok(())
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

        let (cluster, relocated) = locate(data_dir).map_err(|e| {
            DbError::Embedded(format!("data directory {}: {e}", data_dir.display()))
        })?;
        if relocated {
            tracing::info!(
                data_dir = %data_dir.display(),
                cluster = %cluster.display(),
                "the postgres user cannot reach the data directory (a parent directory is closed \
                 to it, such as a home directory of mode 700): the embedded PostgreSQL cluster \
                 lives in {} instead",
                cluster.display()
            );
            prepare_dir(Path::new(RELOCATED_ROOT), None, false)?;
        }
        let data = cluster.join("data");
        let socket_dir = cluster.join("run");
        prepare_dir(&cluster, run_as, relocated)?;
        prepare_dir(&socket_dir, run_as, false)?;

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
