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

/// Seed 002's PostgreSQL settings, written once into a new cluster (`cascade.conf`, included
/// from `postgresql.conf`; an existing cluster keeps what its owner set). Seed 002's memory
/// figures are those of a 4 GiB machine and scale with the memory this one has.
fn tuning(memory: u64, wal_compression: &str) -> String {
    const MB: u64 = 1 << 20;
    let shared_buffers = (memory / 16).clamp(128 * MB, 2048 * MB);
    let effective_cache_size = (memory / 4).max(512 * MB);
    format!(
        "# Written by Cascade at initdb: seed 002's settings, memory figures scaled to this\n\
         # machine's {} MB (seed 002 states them for 4 GiB). Edit freely: Cascade never rewrites it.\n\
         shared_buffers = '{}MB'\n\
         effective_cache_size = '{}MB'\n\
         work_mem = '16MB'\n\
         wal_buffers = '16MB'\n\
         checkpoint_completion_target = 0.9\n\
         max_wal_size = '1GB'\n\
         # Not in seed 002: full-page images compressed in the WAL. Under concurrent writes\n\
         # the commits queue on the WAL's flush, and each write's full-page images are most of\n\
         # its WAL (README, \"Writes\"); PostgreSQL's docs: no added risk of corruption.\n\
         wal_compression = {}\n\
         random_page_cost = 1.1\n\
         effective_io_concurrency = 200\n\
         max_connections = 100\n",
        memory / MB,
        shared_buffers / MB,
        effective_cache_size / MB,
        wal_compression,
    )
}

/// The machine's memory (`MemTotal`), or 4 GiB when `/proc/meminfo` cannot say.
fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(4 << 30)
}

fn write_tuning(
    data: &Path,
    owner: Option<(u32, u32)>,
    wal_compression: &str,
) -> Result<(), DbError> {
    let failed = |path: &Path, e: std::io::Error| {
        DbError::Embedded(format!("cannot write {}: {e}", path.display()))
    };
    let conf = data.join("cascade.conf");
    std::fs::write(&conf, tuning(machine_memory(), wal_compression))
        .map_err(|e| failed(&conf, e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&conf, Some(uid), Some(gid)).map_err(|e| failed(&conf, e))?;
    }
    let main = data.join("postgresql.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&main)
        .map_err(|e| failed(&main, e))?;
    std::io::Write::write_all(&mut file, b"\ninclude_if_exists = 'cascade.conf'\n")
        .map_err(|e| failed(&main, e))
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
            // lz4 where the server was built with it (Debian's is): the cheapest on CPU.
            let lz4 = pg
                .run(
                    "postgres",
                    &[
                        "-D",
                        &data_arg,
                        "-C",
                        "wal_compression",
                        "-c",
                        "wal_compression=lz4",
                    ],
                )
                .is_ok();
            write_tuning(&pg.data, run_as, if lz4 { "lz4" } else { "on" })?;
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

#[cfg(test)]
mod tests {
    use super::tuning;

    const GIB: u64 = 1 << 30;

    #[test]
    fn seed_002_settings_at_4_gib_and_scaled_on_other_machines() {
        let at_4 = tuning(4 * GIB, "lz4");
        assert!(at_4.contains("shared_buffers = '256MB'"), "{at_4}");
        assert!(at_4.contains("effective_cache_size = '1024MB'"), "{at_4}");
        assert!(at_4.contains("random_page_cost = 1.1"), "{at_4}");
        assert!(at_4.contains("max_connections = 100"), "{at_4}");

        let at_24 = tuning(24 * GIB, "lz4");
        assert!(at_24.contains("shared_buffers = '1536MB'"), "{at_24}");
        assert!(at_24.contains("effective_cache_size = '6144MB'"), "{at_24}");

        // A small machine keeps PostgreSQL's own default rather than starving it.
        let at_1 = tuning(GIB, "on");
        assert!(at_1.contains("shared_buffers = '128MB'"), "{at_1}");
        assert!(at_1.contains("effective_cache_size = '512MB'"), "{at_1}");
    }
}
