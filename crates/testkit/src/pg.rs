use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio_postgres::NoTls;

use crate::{free_port, signal_group, temp_dir};

/// A private PostgreSQL server for one test.
pub struct PgServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    /// `-c name=value` settings beyond the test kit's own (TLS).
    settings: Vec<String>,
    /// The PgBouncer [`fresh_database`](Self::fresh_database) hands out URLs through, under
    /// `CASCADE_TEST_POOLER=pgbouncer`; started on first use.
    bouncer: tokio::sync::OnceCell<crate::PgBouncer>,
}

fn server_binaries() -> PathBuf {
    let has = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .rev()
        .find(|d| has(d))
        .expect("PostgreSQL server binaries (apt-get install -y postgresql)")
}

fn postgres_user() -> Option<(u32, u32)> {
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if !root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f[0] == "postgres").then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", path.display());
}

/// An initialised cluster made once per machine and copied for every server: `initdb` costs
/// a second or two, a copy a few milliseconds.
fn template(bin: &Path, run_as: Option<(u32, u32)>) -> PathBuf {
    let version = std::fs::read_to_string(bin.join("../PG_VERSION")).unwrap_or_default();
    let name = format!(
        "cascade-testkit-pg-template-{}-{}",
        bin.display().to_string().replace('/', "_"),
        version.trim()
    );
    let template = std::env::temp_dir().join(name);
    if template.join("PG_VERSION").exists() {
        return template;
    }
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let staging = temp_dir(&format!(
        "pg-template-{}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let data = staging.join("data");
    if let Some((uid, gid)) = run_as {
        chown_tree(&staging, uid, gid);
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
            "-D",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .current_dir("/");
    if let Some((uid, gid)) = run_as {
        initdb.uid(uid).gid(gid);
    }
    let out = initdb.output().expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another test may have won the race; either copy is a valid template.
    if std::fs::rename(&data, &template).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let _ = std::fs::remove_dir_all(&staging);
    template
}

/// A client of database `db` as `postgres` on 127.0.0.1:`port` (PostgreSQL or PgBouncer).
pub(crate) async fn connect_local(
    port: u16,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname(db)
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Waits up to 30 s until `name`, started as `child`, answers a query on `port`; panics with
/// its log when it exits or never does.
pub(crate) async fn wait_until_accepting(
    name: &str,
    port: u16,
    child: &mut Option<Child>,
    log: &Path,
) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = connect_local(port, "postgres").await
            && client.simple_query("SELECT 1").await.is_ok()
        {
            return;
        }
        if let Some(child) = child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("{name} exited with {status}: {}", log());
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not start in 30s: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl PgServer {
    /// Starts a fresh server and waits until it accepts connections.
    pub async fn start() -> PgServer {
        PgServer::start_with(&[], Vec::new()).await
    }

    /// Starts a server that streaming replicas can follow ([`start_replica`]): `wal_level=replica`
    /// and WAL senders. The template cluster's `pg_hba.conf` (initdb `-A trust`) already lets
    /// `replication` connections in over loopback.
    ///
    /// [`start_replica`]: Self::start_replica
    pub async fn start_primary() -> PgServer {
        PgServer::start_primary_with(&[]).await
    }

    /// [`start_primary`](Self::start_primary) with more `name=value` settings, which its
    /// replicas share (a benchmark's `shared_preload_libraries`, or the settings of the server
    /// it is compared with). They come after the kit's own (`fsync=off`, `shared_buffers=16MB`),
    /// so they override them.
    pub async fn start_primary_with(settings: &[&str]) -> PgServer {
        let settings = ["wal_level=replica", "max_wal_senders=10"]
            .iter()
            .chain(settings)
            .map(|s| s.to_string())
            .collect();
        PgServer::start_with(&[], settings).await
    }

    /// A streaming replica of this server: `pg_basebackup -R -X stream` (as the `postgres`
    /// user, into a directory it owns), started on its own free port, returned once it accepts
    /// read-only queries. [`pause`](Self::pause), [`resume`](Self::resume) and
    /// [`kill`](Self::kill) act on the replica alone; it is killed when dropped.
    pub async fn start_replica(&self) -> PgServer {
        let dir = temp_dir("pg-replica");
        if let Some((uid, gid)) = self.run_as {
            chown_tree(&dir, uid, gid);
        }
        let mut backup = Command::new(self.tool("pg_basebackup"));
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .current_dir("/");
        if let Some((uid, gid)) = self.run_as {
            backup.uid(uid).gid(gid);
        }
        let out = backup.output().expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}\nprimary log: {}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let mut replica = PgServer {
            dir,
            port: free_port(),
            child: None,
            bin: self.bin.clone(),
            run_as: self.run_as,
            settings: self.settings.clone(),
            bouncer: tokio::sync::OnceCell::new(),
        };
        replica.spawn().await;
        let in_recovery: bool = replica
            .client("postgres")
            .await
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("ask the replica whether it is in recovery")
            .get(0);
        assert!(
            in_recovery,
            "the replica is not in recovery: {}",
            replica.log()
        );
        replica
    }

    /// A client program of the same installation as `postgres` (`bin` may be a directory of
    /// links to the server alone, as `/usr/local/bin` is here), else the one on `PATH`.
    fn tool(&self, name: &str) -> PathBuf {
        let beside_server = std::fs::canonicalize(self.bin.join("postgres"))
            .ok()
            .and_then(|server| server.parent().map(|dir| dir.join(name)));
        [Some(self.bin.join(name)), beside_server]
            .into_iter()
            .flatten()
            .find(|path| path.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Starts a server that speaks TLS (`ssl=on`) with this certificate chain and key (PEM),
    /// plain connections still allowed.
    pub async fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> PgServer {
        let settings = [
            "ssl=on",
            "ssl_cert_file=server.crt",
            "ssl_key_file=server.key",
        ];
        PgServer::start_with(
            &[("server.crt", cert_pem), ("server.key", key_pem)],
            settings.iter().map(|s| s.to_string()).collect(),
        )
        .await
    }

    /// `files` are written into the data directory (private to the server's user: PostgreSQL
    /// refuses a key others can read), `settings` passed as `-c` options.
    async fn start_with(files: &[(&str, &[u8])], settings: Vec<String>) -> PgServer {
        use std::os::unix::fs::PermissionsExt;
        let bin = server_binaries();
        let run_as = postgres_user();
        let template = template(&bin, run_as);
        let dir = temp_dir("pg");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(dir.join("data"))
            .status()
            .expect("cp");
        assert!(status.success(), "copy the template cluster");
        for (name, contents) in files {
            let path = dir.join("data").join(name);
            std::fs::write(&path, contents).expect("write a server file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod a server file");
        }
        if let Some((uid, gid)) = run_as {
            chown_tree(&dir, uid, gid);
        }
        let mut server = PgServer {
            dir,
            port: free_port(),
            child: None,
            bin,
            run_as,
            settings,
            bouncer: tokio::sync::OnceCell::new(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.dir.join("data"))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=16MB",
            ])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("postgres.log"))
                    .expect("log file"),
            ))
            .current_dir("/")
            .process_group(0);
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        self.child = Some(command.spawn().expect("spawn postgres"));
        wait_until_accepting(
            "postgres",
            self.port,
            &mut self.child,
            &self.dir.join("postgres.log"),
        )
        .await;
    }

    async fn try_connect(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_local(self.port, db).await
    }

    /// The server's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A superuser client on database `db`.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        self.try_connect(db)
            .await
            .expect("connect to the test PostgreSQL")
    }

    /// Creates a new, empty database and returns its URL: through a PgBouncer in transaction
    /// mode in front of this server under `CASCADE_TEST_POOLER=pgbouncer`
    /// ([`direct_url`](crate::direct_url) then gives the direct one).
    pub async fn fresh_database(&self) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        if !crate::pgbouncer::through_pgbouncer() {
            return self.url(&name);
        }
        let bouncer = self
            .bouncer
            .get_or_init(|| crate::PgBouncer::start(self))
            .await;
        let through = bouncer.url(&name);
        crate::pgbouncer::remember_direct(&through, self.url(&name));
        through
    }

    /// The user and group the server runs as (`postgres`, when the tests run as root).
    pub(crate) fn run_as(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// SIGKILL to the server and all its backends: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), Signal::SIGKILL);
            let _ = child.wait();
            // Backends are in the same group; give the kernel a moment to reap them.
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_file(self.dir.join("data/postmaster.pid"));
        }
    }

    /// SIGSTOP: the server stays up but answers nothing, like a hung host.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), Signal::SIGCONT);
        }
    }

    /// Starts the server again on the same port and data (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), Signal::SIGCONT);
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
