use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cascade_testkit::{free_port, temp_dir};

/// `cascade` with a clean environment (only PATH) in an empty working directory, so neither
/// the developer's variables nor a `.env` in the repository leak into a test.
pub fn cascade(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .current_dir(cwd)
        .stdin(Stdio::null());
    command
}

pub fn empty_dir() -> PathBuf {
    temp_dir("cli")
}

/// Runs `cascade` to completion, with a bound so a hang fails the test instead of the suite.
pub fn run_bounded(mut command: Command, bound: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cascade");
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return (child.wait_with_output().expect("output"), started.elapsed());
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "cascade did not exit within {bound:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cascade check` with `args` and `env` (Venice unreachable): its exit code and stdout.
pub fn check_output(env: &[(&str, String)], args: &[&str]) -> (Option<i32>, String) {
    let mut command = cascade(&empty_dir());
    command
        .arg("check")
        .args(args)
        .env("VENICE_API_URL", "http://127.0.0.1:1");
    for (key, value) in env {
        command.env(key, value);
    }
    let (out, _) = run_bounded(command, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), stdout)
}

/// `CONFIG SET` of each pair on the Redis at `url`.
pub async fn config_set(url: &str, pairs: &[(&str, &str)]) {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers");
    for (name, value) in pairs {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut conn)
            .await
            .expect("CONFIG SET");
    }
}

/// The line of `cascade check`'s `text` named `name`, e.g. `  [warn] maxmemory …`.
pub fn check_line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| {
            l.get(9..)
                .is_some_and(|rest| rest.starts_with(&format!("{name} ")))
        })
        .unwrap_or_else(|| panic!("no line {name} in:\n{text}"))
}

/// The `ADMIN_TOKEN` every [`Served`] server is started with (unless a test sets its own), and
/// that [`Served::get_json`] sends to the operator endpoints (`/health/db`).
pub const ADMIN_TOKEN: &str = "foundation-tests-admin-token-0123456789";

pub fn http() -> reqwest::Client {
    cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
        .expect("client")
}

/// A running `cascade serve`, killed on drop.
pub struct Served {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Served {
    /// Starts `cascade serve` with `env` (and [`ADMIN_TOKEN`]) on a free port and waits until
    /// `/health` answers.
    pub async fn start(env: &[(&str, String)]) -> Served {
        Served::start_in(&empty_dir(), env).await
    }

    /// [`start`](Self::start) with `dir` as the working directory.
    pub async fn start_in(dir: &Path, env: &[(&str, String)]) -> Served {
        let port = free_port();
        let log = dir.join("cascade.log");
        let mut command = cascade(dir);
        command
            .arg("serve")
            .env("PORT", port.to_string())
            .env("ADMIN_TOKEN", ADMIN_TOKEN);
        for (key, value) in env {
            command.env(key, value);
            // Under CASCADE_TEST_POOLER=pgbouncer the URL goes through PgBouncer: LISTEN and
            // migrations take the direct one, as a deployment's DATABASE_DIRECT_URL.
            if *key == "DATABASE_URL"
                && let Some(direct) = cascade_testkit::direct_url(value)
                && !env.iter().any(|(k, _)| *k == "DATABASE_DIRECT_URL")
            {
                command.env("DATABASE_DIRECT_URL", direct);
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn cascade serve");
        let mut served = Served {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = served.child.try_wait() {
                panic!("cascade serve exited with {status}:\n{}", served.log());
            }
            if http()
                .get(format!("{}/health", served.base))
                .send()
                .await
                .is_ok()
            {
                let through_pgbouncer = env
                    .iter()
                    .any(|(k, v)| *k == "DATABASE_URL" && cascade_testkit::direct_url(v).is_some());
                assert!(
                    !through_pgbouncer || served.log().contains("through PgBouncer"),
                    "PgBouncer was not detected:\n{}",
                    served.log()
                );
                return served;
            }
            assert!(
                Instant::now() < deadline,
                "cascade serve did not answer in time:\n{}",
                served.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path`; the operator endpoints (`/health/db`) with [`ADMIN_TOKEN`].
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let mut request = http().get(format!("{}{path}", self.base));
        if path.starts_with("/health/db") {
            request = request.bearer_auth(ADMIN_TOKEN);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// Polls `path` until `check` accepts the answer, for at most `bound`.
    pub async fn wait_for(
        &self,
        path: &str,
        bound: Duration,
        what: &str,
        check: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + bound;
        loop {
            let (status, body) = self.get_json(path).await;
            if check(status, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still {status} {body} after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit after [`terminate`](Self::terminate).
    pub fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cascade did not exit within {bound:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
    }
}
