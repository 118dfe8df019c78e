//! A private PgBouncer in transaction mode in front of a test's PostgreSQL.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use crate::pg::{connect_local, wait_until_accepting};
use crate::{PgServer, free_port, signal_group, temp_dir};
use nix::sys::signal::Signal;

/// Debian's `/usr/sbin/pgbouncer` (1.18 on bookworm: no protocol-level prepared statements)
/// in **transaction** mode with two server connections per database and user, so that
/// consecutive statements of one client really do land on different server connections and
/// session state (named prepared statements, `LISTEN`, session advisory locks, `SET`) is
/// lost between transactions, as in production. Killed on drop.
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    postgres_port: u16,
}

/// Server connections per database and user: small, so that the pool is shared for real.
pub const SERVER_POOL_SIZE: usize = 2;

impl PgBouncer {
    /// Starts PgBouncer in front of `postgres` (every database, user `postgres`, trust; its
    /// admin console refuses that user, as it does an application's) and waits until it
    /// answers.
    pub async fn start(postgres: &PgServer) -> PgBouncer {
        PgBouncer::launch(postgres, "").await
    }

    /// [`start`](Self::start) with `postgres` in `admin_users` (its admin console answers).
    pub async fn start_with_admin(postgres: &PgServer) -> PgBouncer {
        PgBouncer::launch(postgres, "admin_users = postgres\n").await
    }

    async fn launch(postgres: &PgServer, extra: &str) -> PgBouncer {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
            .expect("PgBouncer (apt-get install -y pgbouncer)");
        let dir = temp_dir("pgbouncer");
        let port = free_port();
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        let ini = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={pg}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\n\
             default_pool_size = {SERVER_POOL_SIZE}\n\
             max_client_conn = 1000\n\
             max_db_connections = 0\n\
             query_wait_timeout = 30\n\
             logfile = {dir}/pgbouncer.log\n\
             {extra}",
            pg = postgres.port(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
        let mut command = Command::new(binary);
        command
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0);
        // PgBouncer refuses to run as root.
        if let Some((uid, gid)) = postgres.run_as() {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown {}", dir.display());
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().expect("spawn pgbouncer");
        let mut bouncer = PgBouncer {
            dir,
            port,
            child: Some(child),
            postgres_port: postgres.port(),
        };
        wait_until_accepting(
            "pgbouncer",
            port,
            &mut bouncer.child,
            &bouncer.dir.join("pgbouncer.log"),
        )
        .await;
        bouncer
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` through PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// PgBouncer's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// A client of database `db` through PgBouncer.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        connect_local(self.port, db)
            .await
            .expect("connect through pgbouncer")
    }

    /// The URL of the same database straight to PostgreSQL, for what must bypass PgBouncer
    /// (`DATABASE_DIRECT_URL`: `LISTEN`, migrations).
    pub fn direct_url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{db}",
            self.postgres_port
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), Signal::SIGKILL);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `CASCADE_TEST_POOLER=pgbouncer`: [`PgServer::fresh_database`] hands out URLs through a
/// PgBouncer in transaction mode, so a whole suite runs through it unchanged (scripts/test
/// runs the catalog and identity suites so).
pub fn through_pgbouncer() -> bool {
    std::env::var("CASCADE_TEST_POOLER").is_ok_and(|v| v == "pgbouncer")
}

/// Direct URLs of the databases handed out through PgBouncer, by their PgBouncer URL.
static DIRECT: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

pub(crate) fn remember_direct(through: &str, direct: String) {
    DIRECT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_default()
        .insert(through.to_string(), direct);
}

/// For a URL [`PgServer::fresh_database`] handed out through PgBouncer, the same database
/// straight to PostgreSQL (what a deployment sets as `DATABASE_DIRECT_URL`); `None` for
/// any other URL.
pub fn direct_url(url: &str) -> Option<String> {
    DIRECT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()?
        .get(url)
        .cloned()
}
