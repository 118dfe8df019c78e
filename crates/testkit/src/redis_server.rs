use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
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
        RedisServer::start_in(dir, args, Some(tls_port)).await
    }

    async fn start_with(args: Vec<String>, tls_port: Option<u16>) -> RedisServer {
        RedisServer::start_in(temp_dir("redis"), args, tls_port).await
    }

    async fn start_in(dir: PathBuf, args: Vec<String>, tls_port: Option<u16>) -> RedisServer {
        let mut server = RedisServer {
            dir,
            port: free_port(),
            child: None,
            tls_port,
            args,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
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
            assert!(
                Instant::now() < deadline,
                "redis-server did not start in 20s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn answers_ping(&self) -> bool {
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

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
