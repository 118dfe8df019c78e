use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::{free_port, signal_group, temp_dir};

/// A private `redis-server` for one test; it writes nothing to disk unless told to
/// ([`save`](RedisServer::save)).
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// The TLS port, when started with [`start_tls`](RedisServer::start_tls).
    tls_port: Option<u16>,
    /// Arguments beyond the test kit's own (TLS files, ACL users).
    args: Vec<String>,
    /// How the test kit itself reaches the server.
    access: Access,
}

/// How the test kit reaches a server: plain text, or (a server that speaks only TLS) TLS
/// checked against a CA, as an ACL user if one is given.
#[derive(Clone, Default)]
pub(crate) struct Access {
    /// The CA's certificate (PEM).
    ca: Option<Vec<u8>>,
    /// ACL user and password.
    user: Option<(String, String)>,
}

impl Access {
    fn connect(&self, port: u16) -> Option<redis::Connection> {
        let client = match &self.ca {
            None => redis::Client::open(format!("redis://127.0.0.1:{port}")),
            Some(pem) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let user = self
                    .user
                    .as_ref()
                    .map(|(user, password)| format!("{user}:{password}@"))
                    .unwrap_or_default();
                redis::Client::build_with_tls(
                    format!("rediss://{user}127.0.0.1:{port}"),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                )
            }
        };
        client
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()
            .filter(|conn| conn.set_read_timeout(Some(Duration::from_secs(1))).is_ok())
    }

    /// `INFO <section>` of the server at `port`; empty if it does not answer.
    fn info(&self, port: u16, section: &str) -> String {
        self.connect(port)
            .and_then(|mut conn| redis::cmd("INFO").arg(section).query(&mut conn).ok())
            .unwrap_or_default()
    }
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(Vec::new(), None).await
    }

    /// Starts a server with extra command-line arguments, e.g. an ACL user:
    /// `["--user", "app", "on", ">secret", "~*", "&*", "+@all"]`.
    pub async fn start_with_args(args: &[&str]) -> RedisServer {
        RedisServer::start_with(args.iter().map(|a| a.to_string()).collect(), None).await
    }

    /// Starts a server that also speaks TLS ([`tls_url`](Self::tls_url)) with this
    /// certificate and key (PEM); clients need not present certificates.
    pub async fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> RedisServer {
        let dir = temp_dir("redis");
        std::fs::write(dir.join("server.crt"), cert_pem).expect("write the certificate");
        std::fs::write(dir.join("server.key"), key_pem).expect("write the key");
        let tls_port = free_port();
        let path = |name: &str| dir.join(name).display().to_string();
        let args = vec![
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".to_string(),
            path("server.crt"),
            "--tls-key-file".to_string(),
            path("server.key"),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
        ];
        RedisServer::start_in(dir, args, Some(tls_port), Access::default()).await
    }

    /// Starts a server that speaks only TLS (`port 0`; [`port`](Self::port) is its TLS port),
    /// also to its primary (`tls-replication yes`), with this certificate and key and
    /// `ca_pem` as the CA it trusts, and extra arguments (`--user`, `--replicaof`, ...). The
    /// test kit reaches it as `user`, if given.
    async fn start_tls_only(
        (cert_pem, key_pem, ca_pem): (&[u8], &[u8], &[u8]),
        user: Option<(String, String)>,
        extra: &[&str],
    ) -> RedisServer {
        let dir = temp_dir("redis");
        let mut args = tls_files(&dir, cert_pem, key_pem, ca_pem)
            .into_iter()
            .flat_map(|(name, value)| [format!("--{name}"), value])
            .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| a.to_string()));
        let access = Access {
            ca: Some(ca_pem.to_vec()),
            user,
        };
        RedisServer::start_in(dir, args, None, access).await
    }

    async fn start_with(args: Vec<String>, tls_port: Option<u16>) -> RedisServer {
        RedisServer::start_in(temp_dir("redis"), args, tls_port, Access::default()).await
    }

    async fn start_in(
        dir: PathBuf,
        args: Vec<String>,
        tls_port: Option<u16>,
        access: Access,
    ) -> RedisServer {
        let mut server = RedisServer {
            dir,
            port: free_port(),
            child: None,
            tls_port,
            args,
            access,
        };
        // A port taken between `free_port` and the server's bind (by another test's server or
        // a client's ephemeral port) makes it exit at once: take other ports and start again.
        for attempt in 1.. {
            match server.try_spawn().await {
                Ok(()) => break,
                Err(log) if attempt < 5 => {
                    eprintln!("redis-server exited at start, new ports (attempt {attempt}): {log}");
                    server.port = free_port();
                    // A cluster node's config names its former ports.
                    let _ = std::fs::remove_file(server.dir.join("nodes.conf"));
                    if let Some(i) = server.args.iter().position(|a| a == "--cluster-port") {
                        server.args[i + 1] = free_port().to_string();
                    }
                }
                Err(log) => panic!("redis-server exited at start 5 times: {log}"),
            }
        }
        server
    }

    /// Starts the server on its port (a restart: the same one).
    async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("redis-server exited at start: {log}");
        }
    }

    /// Starts the server and waits until it answers; `Err` with its log if it exits first.
    async fn try_spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let ports = match self.access.ca {
            None => vec!["--port", &port],
            Some(_) => vec!["--port", "0", "--tls-port", &port],
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn redis-server (apt-get install -y redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers_ping() {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                return Err(log.lines().rev().take(3).collect::<Vec<_>>().join(" | "));
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start in 20s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn answers_ping(&self) -> bool {
        if self.access.ca.is_some() {
            return self
                .access
                .connect(self.port)
                .is_some_and(|mut conn| redis::cmd("PING").query::<String>(&mut conn).is_ok());
        }
        let Ok(mut stream) = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        ) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        // A server that requires a password answers -NOAUTH: up all the same.
        let mut buf = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut buf).is_ok()
            && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server was started and not [killed](Self::kill) since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many times the server ran `command` (`INFO commandstats`; a script's own commands
    /// count too), asked through a connection of its own.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let client = redis::Client::open(self.url()).expect("a valid URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("the test server answers");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        let field = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&field))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().expect("a count"))
    }

    /// `rediss://localhost:<tls port>` of a server started with [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("a server started with start_tls");
        format!("rediss://localhost:{port}")
    }

    /// SIGKILL: every key is gone, connections drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server keeps its data and its sockets but answers nothing.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`pause`](Self::pause): it answers again, with its old data.
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), Signal::SIGCONT);
        }
    }

    /// `SAVE`: the data as of now goes to `dump.rdb` in the server's directory, which the
    /// next [`restart`](Self::restart) loads (a production Redis coming back from its last
    /// snapshot, without what was written after it).
    pub fn save(&self) {
        let mut stream =
            TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(2))
                .expect("connect to redis-server");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
        let mut buf = [0u8; 5];
        stream.write_all(b"SAVE\r\n").expect("send SAVE");
        stream.read_exact(&mut buf).expect("SAVE answered");
        assert_eq!(&buf, b"+OK\r\n", "SAVE failed");
    }

    /// Starts a server on the same port: empty, or with the data of the last
    /// [`save`](Self::save).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, one replica (`--replicaof`) and three `redis-server --sentinel` processes
/// watching them (quorum 2, a master unanswering for 1 s is down), for failover tests. Every
/// process has its own temp dir and free port, and is killed on drop.
pub struct RedisSentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<SentinelProcess>,
    /// How the test kit reaches the sentinels (the data nodes' own is theirs).
    access: Access,
}

struct SentinelProcess {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), Signal::SIGKILL);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisSentinels {
    /// The name the sentinels monitor the primary under.
    pub const MASTER: &'static str = "cascade";

    /// Starts the primary, its replica (synced), and the sentinels, and waits until every
    /// sentinel knows the replica and the two other sentinels (so a failover can be voted).
    pub async fn start() -> RedisSentinels {
        let primary = RedisServer::start().await;
        let replica = RedisServer::start_with_args(&[
            "--replicaof",
            "127.0.0.1",
            &primary.port().to_string(),
        ])
        .await;
        RedisSentinels::watch(primary, replica, None).await
    }

    /// As [`start`](Self::start), but every process speaks only TLS (`port 0`, `tls-port`,
    /// `tls-replication yes`), with this certificate and key (for `127.0.0.1`) signed by the
    /// CA `ca_pem`; clients need not present certificates. The data nodes know one ACL user,
    /// `user` with `password` (the default user is off): the replica replicates as it
    /// (`masteruser`/`masterauth`), the sentinels monitor as it (`sentinel auth-user`/`auth-pass`).
    pub async fn start_tls(
        (cert_pem, key_pem, ca_pem): (&[u8], &[u8], &[u8]),
        user: &str,
        password: &str,
    ) -> RedisSentinels {
        let tls = (cert_pem, key_pem, ca_pem);
        let credentials = Some((user.to_string(), password.to_string()));
        let pass = format!(">{password}");
        let acl = [
            "--user", "default", "off", "--user", user, "on", &pass, "~*", "&*", "+@all",
        ];
        let primary = RedisServer::start_tls_only(tls, credentials.clone(), &acl).await;
        let primary_port = primary.port().to_string();
        let replica_args = [
            &acl[..],
            &[
                "--replicaof",
                "127.0.0.1",
                &primary_port,
                "--masteruser",
                user,
                "--masterauth",
                password,
            ],
        ]
        .concat();
        let replica = RedisServer::start_tls_only(tls, credentials, &replica_args).await;
        let sentinel = SentinelTls {
            cert: cert_pem,
            key: key_pem,
            ca: ca_pem,
            user,
            password,
        };
        RedisSentinels::watch(primary, replica, Some(sentinel)).await
    }

    /// Waits for `replica` to sync, starts the sentinels on `primary`, and waits until each
    /// knows the replica and the two others.
    async fn watch(
        primary: RedisServer,
        replica: RedisServer,
        tls: Option<SentinelTls<'_>>,
    ) -> RedisSentinels {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !replica
            .access
            .info(replica.port(), "replication")
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the replica did not sync in 20s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sentinels = (0..3)
            .map(|_| spawn_sentinel(primary.port(), tls.as_ref()))
            .collect::<Vec<_>>();
        let access = Access {
            ca: tls.map(|tls| tls.ca.to_vec()),
            user: None,
        };
        let group = RedisSentinels {
            primary,
            replica,
            sentinels,
            access,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = group.sentinels.iter().all(|s| {
                group.sentinel_master(s.port).is_some_and(|m| {
                    m.get("num-slaves").is_some_and(|n| n == "1")
                        && m.get("num-other-sentinels").is_some_and(|n| n == "2")
                })
            });
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not find the replica and each other in 30s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        group
    }

    /// `redis://127.0.0.1:<port>` of each sentinel (`rediss://` when started with
    /// [`start_tls`](Self::start_tls)).
    pub fn sentinel_urls(&self) -> Vec<String> {
        let scheme = if self.access.ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.sentinels
            .iter()
            .map(|s| format!("{scheme}://127.0.0.1:{}", s.port))
            .collect()
    }

    /// SIGKILL of the primary: the sentinels see it down after 1 s and promote the replica.
    pub fn kill_primary(&mut self) {
        self.primary.kill();
    }

    /// `SENTINEL FAILOVER`: the sentinels promote the replica while the primary still runs
    /// (it is demoted to a replica some seconds later).
    pub fn failover(&self) {
        let mut conn = self
            .access
            .connect(self.sentinels[0].port)
            .expect("a sentinel answers");
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(Self::MASTER)
            .query(&mut conn)
            .expect("SENTINEL FAILOVER");
    }

    /// Whether the (first) primary still says it is a master.
    pub fn primary_is_master(&self) -> bool {
        let primary = &self.primary;
        primary
            .access
            .info(primary.port(), "replication")
            .contains("role:master")
    }

    /// The master's port as the first answering sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let mut conn = self.access.connect(s.port)?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(Self::MASTER)
                .query(&mut conn)
                .ok()?;
            addr.map(|(_, port)| port)
        })
    }

    /// Waits until every sentinel names the replica master and the replica says it is one;
    /// panics after `bound`.
    pub async fn wait_for_promotion(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            let named = self.sentinels.iter().all(|s| {
                self.sentinel_master(s.port).is_some_and(|m| {
                    m.get("port") == Some(&self.replica.port().to_string())
                        && m.get("flags").is_some_and(|f| f == "master")
                })
            });
            let replica = &self.replica;
            let role = replica.access.info(replica.port(), "replication");
            if named && role.contains("role:master") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not promote the replica within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A sentinel's TLS files and the data nodes' ACL user.
struct SentinelTls<'a> {
    cert: &'a [u8],
    key: &'a [u8],
    ca: &'a [u8],
    user: &'a str,
    password: &'a str,
}

/// Writes the certificate, key and CA into `dir`: the TLS settings (name, value) of a
/// server that speaks only TLS, to its peers too, and asks clients for no certificate.
fn tls_files(dir: &Path, cert: &[u8], key: &[u8], ca: &[u8]) -> Vec<(&'static str, String)> {
    let mut settings = vec![
        ("tls-replication", "yes".to_string()),
        ("tls-auth-clients", "no".to_string()),
    ];
    for (name, file, pem) in [
        ("tls-cert-file", "server.crt", cert),
        ("tls-key-file", "server.key", key),
        ("tls-ca-cert-file", "ca.crt", ca),
    ] {
        std::fs::write(dir.join(file), pem).expect("write a TLS file");
        settings.push((name, dir.join(file).display().to_string()));
    }
    settings
}

fn spawn_sentinel(primary_port: u16, tls: Option<&SentinelTls>) -> SentinelProcess {
    let dir = temp_dir("sentinel");
    let port = free_port();
    let master = RedisSentinels::MASTER;
    let (ports, secure) = match tls {
        None => (format!("port {port}\n"), String::new()),
        Some(tls) => {
            let files = tls_files(&dir, tls.cert, tls.key, tls.ca)
                .into_iter()
                .map(|(name, value)| format!("{name} {value}\n"))
                .collect::<String>();
            let auth = format!(
                "sentinel auth-user {master} {}\nsentinel auth-pass {master} {}\n",
                tls.user, tls.password
            );
            (format!("port 0\ntls-port {port}\n{files}"), auth)
        }
    };
    // Sentinel rewrites its configuration file (what it learns): it must be its own and
    // writable.
    let conf = format!(
        "{ports}bind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile sentinel.log\n\
         sentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
         sentinel down-after-milliseconds {master} 1000\n\
         sentinel failover-timeout {master} 5000\n\
         sentinel parallel-syncs {master} 1\n{secure}",
        dir = dir.display()
    );
    let path = dir.join("sentinel.conf");
    std::fs::write(&path, conf).expect("write sentinel.conf");
    let child = Command::new("redis-server")
        .arg(&path)
        .arg("--sentinel")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn redis-server --sentinel (apt-get install -y redis-server)");
    SentinelProcess {
        dir,
        port,
        child: Some(child),
    }
}

pub(crate) fn connect(port: u16) -> Option<redis::Connection> {
    Access::default().connect(port)
}

/// `INFO <section>` of the server at `port`; empty if it does not answer.
pub(crate) fn info(port: u16, section: &str) -> String {
    Access::default().info(port, section)
}

impl RedisSentinels {
    /// `SENTINEL MASTER <name>` of the sentinel at `port`, as field → value.
    fn sentinel_master(&self, port: u16) -> Option<std::collections::HashMap<String, String>> {
        let mut conn = self.access.connect(port)?;
        redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(RedisSentinels::MASTER)
            .query(&mut conn)
            .ok()
    }
}
