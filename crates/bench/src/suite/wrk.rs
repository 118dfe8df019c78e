//! `wrk` runs: each throughput scenario is a list of paths the connections cycle through,
//! handed to wrk through a file and a Lua script that prints one machine-readable result line.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::report::Row;

/// How to run wrk against the server under test.
pub struct Wrk {
    pub bin: PathBuf,
    pub base: String,
    /// Where the path lists and scripts are written.
    pub work: PathBuf,
    pub seconds: u64,
    pub connections: usize,
    /// The access token that writes carry.
    pub token: String,
}

/// wrk's threads: wrk itself is light, and the server needs the cores more.
const WRK_THREADS: usize = 2;

const WRK_SCRIPT: &str = r#"
local paths = {}
for line in io.lines(PATHS_FILE) do paths[#paths + 1] = line end
local counter = 0
-- A global, not a local: setup's thread:set writes the thread's globals, which a local of
-- the same name would shadow (every thread would then start at 0).
offset = 0
local threads = {}
-- Each thread starts its walk at its own share of the paths, so a walk over many paths (the
-- miss-heavy case) reads each path once before any thread comes back to it.
function setup(thread)
  thread:set("offset", #threads * math.floor(#paths / THREADS))
  threads[#threads + 1] = thread
end
function init(args)
  counter = offset
end
function request()
  counter = counter + 1
  local path = paths[(counter % #paths) + 1]
  if METHOD == "PATCH" then
    return wrk.format("PATCH", path,
      { ["Content-Type"] = "application/json", ["Authorization"] = AUTHORIZATION },
      '{"metadata":{"bench":' .. counter .. '}}')
  end
  return wrk.format("GET", path)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

impl Wrk {
    /// The same wrk (binary, time, connections) against another server of the run, its
    /// writes carrying `token`.
    pub fn against(&self, base: &str, token: &str) -> Wrk {
        Wrk {
            bin: self.bin.clone(),
            base: base.to_string(),
            work: self.work.clone(),
            seconds: self.seconds,
            connections: self.connections,
            token: token.to_string(),
        }
    }

    /// Runs wrk for `seconds` over `paths` (GET, or `method`) and reads its result.
    pub async fn run_for(
        &self,
        name: &str,
        paths: &[String],
        method: Option<&str>,
        seconds: u64,
    ) -> anyhow::Result<Row> {
        self.run_timed(&self.base, name, paths, method, seconds)
            .await
    }

    /// Runs wrk for the configured time against another server (the bare ceiling).
    pub async fn run_against(
        &self,
        base: &str,
        name: &str,
        paths: &[String],
        method: Option<&str>,
    ) -> anyhow::Result<Row> {
        self.run_timed(base, name, paths, method, self.seconds)
            .await
    }

    async fn run_timed(
        &self,
        base: &str,
        name: &str,
        paths: &[String],
        method: Option<&str>,
        seconds: u64,
    ) -> anyhow::Result<Row> {
        eprintln!("bench: {name}");
        let script = self.script(name, paths, method)?;
        // wrk stops itself after `seconds`; the bound only catches a wrk that hangs.
        let bound = Duration::from_secs(seconds + 60);
        let output = tokio::time::timeout(
            bound,
            tokio::process::Command::new(&self.bin)
                .args(["-t", &WRK_THREADS.to_string()])
                .args(["-c", &self.connections.to_string()])
                .args(["-d", &format!("{seconds}s"), "--timeout", "5s", "-s"])
                .arg(&script)
                .arg(base)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("wrk did not finish {name} within {bound:?}"))?
        .context("running wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let result = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .with_context(|| {
                format!(
                    "wrk printed no result for {name}: {stdout}{}",
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        parse_result(name, result)
    }

    /// Writes the path list and the script for scenario `name`; returns the script's path.
    fn script(
        &self,
        name: &str,
        paths: &[String],
        method: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let paths_file = self.work.join(format!("{slug}.paths"));
        std::fs::write(&paths_file, paths.join("\n") + "\n")?;
        let script = self.work.join(format!("{slug}.lua"));
        let header = format!(
            "local PATHS_FILE = {:?}\nlocal METHOD = {:?}\nlocal AUTHORIZATION = {:?}\nlocal THREADS = {WRK_THREADS}\n",
            paths_file.display().to_string(),
            method.unwrap_or("GET"),
            format!("Bearer {}", self.token),
        );
        std::fs::write(&script, header + WRK_SCRIPT)?;
        Ok(script)
    }
}

/// The script's `RESULT {...}` line as a row.
fn parse_result(name: &str, result: &str) -> anyhow::Result<Row> {
    let r: Value = serde_json::from_str(result)?;
    let num = |k: &str| r[k].as_u64().unwrap_or(0);
    let requests = num("requests");
    Ok(Row {
        scenario: name.to_string(),
        requests,
        req_per_sec: requests as f64 / (num("duration_us").max(1) as f64 / 1e6),
        p50_ms: num("p50_us") as f64 / 1000.0,
        p99_ms: num("p99_us") as f64 / 1000.0,
        errors: num("status_errors") + num("socket_errors"),
        ratio_to_baseline: None,
        ratio_to_ceiling: None,
        notes: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_line_becomes_a_row() {
        let row = parse_result(
            "x",
            r#"{"requests":2000,"duration_us":2000000,"status_errors":1,"socket_errors":2,"p50_us":1500,"p99_us":9000}"#,
        )
        .unwrap();
        assert_eq!(row.requests, 2000);
        assert_eq!(row.req_per_sec, 1000.0);
        assert_eq!((row.p50_ms, row.p99_ms), (1.5, 9.0));
        assert_eq!(row.errors, 3);
    }
}
