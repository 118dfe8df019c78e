//! The agents module's settings and cache namespaces.

use std::time::Duration;

use cascade_core::config::{Namespace, Parser};

/// One agent: `<owner id>:<agent id>` → the agent's JSON.
pub const AGENTS: &str = "agents";
/// A page of an owner's list: `<owner id>:<canonical query>`, tagged with the owner.
pub const AGENT_LISTS: &str = "agent_lists";
/// `GET /search`'s answers of an owner's agents: `<owner id>:<limit>:<text>`, tagged with the
/// owner as the list pages are (every agent write removes them).
pub const AGENT_SEARCH: &str = "agent_search";
/// The same of an owner's workflows, tagged `workflows-of:<owner>`.
pub const WORKFLOW_SEARCH: &str = "workflow_search";
/// The `http` executor's connector: answers are never cached (its calls are uncached), but a
/// connector names its namespaces.
pub const HTTP_EXECUTOR: &str = "agents_http";
pub const HTTP_EXECUTOR_LAST_GOOD: &str = "agents_http_last_good";

/// The module's settings, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawAgentsConfig {
    /// Most agents one `POST /agents/bulk` may create [default: 100].
    #[arg(long, env = "AGENTS_BULK_MAX", global = true)]
    pub agents_bulk_max: Option<String>,
    /// Largest memory snapshot, bytes of JSON [default: 262144].
    #[arg(long, env = "AGENTS_MEMORY_MAX_BYTES", global = true)]
    pub agents_memory_max_bytes: Option<String>,
    /// Memory snapshots kept per agent; an append past it deletes the oldest [default: 100].
    #[arg(long, env = "AGENTS_MEMORY_RETENTION", global = true)]
    pub agents_memory_retention: Option<String>,
    /// Execution workers in this process; 0 runs none (an API-only instance) [default: 2].
    #[arg(long, env = "AGENTS_WORKERS", global = true)]
    pub agents_workers: Option<String>,
    /// Executions one worker claims at once [default: 32].
    #[arg(long, env = "AGENTS_WORKER_BATCH", global = true)]
    pub agents_worker_batch: Option<String>,
    /// How often an idle worker looks for executions without a wake-up [default: 1s].
    #[arg(long, env = "AGENTS_POLL_INTERVAL", global = true)]
    pub agents_poll_interval: Option<String>,
    /// Wake idle workers with LISTEN/NOTIFY (behind PgBouncer on DATABASE_DIRECT_URL); false
    /// polls only [default: true].
    #[arg(long, env = "AGENTS_LISTEN", global = true)]
    pub agents_listen: Option<String>,
    /// How often a worker renews its claims, and how often lapsed claims are looked for
    /// [default: 2s].
    #[arg(long, env = "AGENTS_HEARTBEAT_INTERVAL", global = true)]
    pub agents_heartbeat_interval: Option<String>,
    /// A claim not renewed for this long is taken back and retried [default: 30s].
    #[arg(long, env = "AGENTS_HEARTBEAT_TIMEOUT", global = true)]
    pub agents_heartbeat_timeout: Option<String>,
    /// Attempts of an execution before it fails, unless its enqueue says otherwise [default: 3].
    #[arg(long, env = "AGENTS_MAX_ATTEMPTS", global = true)]
    pub agents_max_attempts: Option<String>,
    /// The wait before a second attempt, doubled for each further one (at most 1h) [default: 1s].
    #[arg(long, env = "AGENTS_RETRY_BACKOFF", global = true)]
    pub agents_retry_backoff: Option<String>,
    /// Longest run of one step before it counts as failed [default: 60s].
    #[arg(long, env = "AGENTS_STEP_TIMEOUT", global = true)]
    pub agents_step_timeout: Option<String>,
    /// Age after which finished executions are deleted; 0 keeps them [default: 168h].
    #[arg(long, env = "AGENTS_EXECUTIONS_RETENTION", global = true)]
    pub agents_executions_retention: Option<String>,
    /// Base URL of the service the `http` step capability calls; unset: no `http` capability.
    #[arg(long, env = "AGENTS_HTTP_URL", global = true)]
    pub agents_http_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AgentsConfig {
    pub bulk_max: usize,
    pub memory_max_bytes: usize,
    pub memory_retention: i64,
    pub executions: ExecutionsConfig,
}

/// The execution workers' settings.
#[derive(Debug, Clone)]
pub struct ExecutionsConfig {
    pub workers: usize,
    pub batch: i64,
    pub poll_interval: Duration,
    pub listen: bool,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_attempts: i32,
    pub retry_backoff: Duration,
    pub step_timeout: Duration,
    /// `None`: finished executions are kept.
    pub retention: Option<Duration>,
    pub http_url: Option<String>,
}

impl AgentsConfig {
    pub fn parse(p: &mut Parser, raw: &RawAgentsConfig) -> AgentsConfig {
        let bulk_max = p.number(
            "AGENTS_BULK_MAX",
            raw.agents_bulk_max.as_deref(),
            100,
            "a number of agents",
        );
        if !(1..=1000).contains(&bulk_max) {
            p.fail("AGENTS_BULK_MAX", "must be between 1 and 1000");
        }
        let workers = p.number(
            "AGENTS_WORKERS",
            raw.agents_workers.as_deref(),
            2,
            "a number of workers",
        );
        if workers > 256 {
            p.fail("AGENTS_WORKERS", "must be between 0 and 256");
        }
        let batch = p.number(
            "AGENTS_WORKER_BATCH",
            raw.agents_worker_batch.as_deref(),
            32,
            "a number of executions",
        );
        if !(1..=1000).contains(&batch) {
            p.fail("AGENTS_WORKER_BATCH", "must be between 1 and 1000");
        }
        let max_attempts = p.number(
            "AGENTS_MAX_ATTEMPTS",
            raw.agents_max_attempts.as_deref(),
            3,
            "a number of attempts",
        );
        if !(1..=100).contains(&max_attempts) {
            p.fail("AGENTS_MAX_ATTEMPTS", "must be between 1 and 100");
        }
        let s = Duration::from_secs;
        let heartbeat_interval = p.positive_duration(
            "AGENTS_HEARTBEAT_INTERVAL",
            &raw.agents_heartbeat_interval,
            s(2),
        );
        let heartbeat_timeout = p.positive_duration(
            "AGENTS_HEARTBEAT_TIMEOUT",
            &raw.agents_heartbeat_timeout,
            s(30),
        );
        if heartbeat_timeout < heartbeat_interval * 2 {
            p.fail(
                "AGENTS_HEARTBEAT_TIMEOUT",
                "must be at least twice AGENTS_HEARTBEAT_INTERVAL (a claim would lapse between two heartbeats)",
            );
        }
        let retention = p.duration(
            "AGENTS_EXECUTIONS_RETENTION",
            &raw.agents_executions_retention,
            s(7 * 24 * 3600),
        );
        let http_url = raw
            .agents_http_url
            .as_ref()
            .map(|_| p.http_url("AGENTS_HTTP_URL", &raw.agents_http_url, ""));
        let executions = ExecutionsConfig {
            workers,
            batch,
            poll_interval: p.positive_duration(
                "AGENTS_POLL_INTERVAL",
                &raw.agents_poll_interval,
                s(1),
            ),
            listen: p.boolean("AGENTS_LISTEN", &raw.agents_listen, true),
            heartbeat_interval,
            heartbeat_timeout,
            max_attempts,
            retry_backoff: p.duration("AGENTS_RETRY_BACKOFF", &raw.agents_retry_backoff, s(1)),
            step_timeout: p.positive_duration(
                "AGENTS_STEP_TIMEOUT",
                &raw.agents_step_timeout,
                s(60),
            ),
            retention: (!retention.is_zero()).then_some(retention),
            http_url,
        };
        let memory_max_bytes = p.number(
            "AGENTS_MEMORY_MAX_BYTES",
            raw.agents_memory_max_bytes.as_deref(),
            256 * 1024,
            "a number of bytes",
        );
        if !(1..=16 * 1024 * 1024).contains(&memory_max_bytes) {
            p.fail("AGENTS_MEMORY_MAX_BYTES", "must be between 1 and 16777216");
        }
        let memory_retention = p.number(
            "AGENTS_MEMORY_RETENTION",
            raw.agents_memory_retention.as_deref(),
            100,
            "a number of snapshots",
        );
        if !(1..=100_000).contains(&memory_retention) {
            p.fail("AGENTS_MEMORY_RETENTION", "must be between 1 and 100000");
        }
        AgentsConfig {
            bulk_max,
            memory_max_bytes,
            memory_retention,
            executions,
        }
    }

    /// Rows for `cascade config`.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let e = &self.executions;
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        vec![
            ("AGENTS_BULK_MAX", self.bulk_max.to_string()),
            ("AGENTS_MEMORY_MAX_BYTES", self.memory_max_bytes.to_string()),
            ("AGENTS_MEMORY_RETENTION", self.memory_retention.to_string()),
            ("AGENTS_WORKERS", e.workers.to_string()),
            ("AGENTS_WORKER_BATCH", e.batch.to_string()),
            ("AGENTS_POLL_INTERVAL", secs(e.poll_interval)),
            ("AGENTS_LISTEN", e.listen.to_string()),
            ("AGENTS_HEARTBEAT_INTERVAL", secs(e.heartbeat_interval)),
            ("AGENTS_HEARTBEAT_TIMEOUT", secs(e.heartbeat_timeout)),
            ("AGENTS_MAX_ATTEMPTS", e.max_attempts.to_string()),
            ("AGENTS_RETRY_BACKOFF", secs(e.retry_backoff)),
            ("AGENTS_STEP_TIMEOUT", secs(e.step_timeout)),
            (
                "AGENTS_EXECUTIONS_RETENTION",
                e.retention.map_or("0 (kept)".into(), secs),
            ),
            (
                "AGENTS_HTTP_URL",
                e.http_url.clone().unwrap_or_else(|| "(unset)".into()),
            ),
        ]
    }

    /// The module's cache namespaces: every write removes what it changed, so the TTLs only
    /// bound memory.
    pub fn namespaces(&self) -> Vec<Namespace> {
        let s = Duration::from_secs;
        vec![
            Namespace::new(AGENTS, s(300)).keyed("cache:agent"),
            Namespace::new(AGENT_LISTS, s(120)).keyed("cache:agents"),
            // Brief: a search is cheap to redo, and the space of texts is large.
            Namespace::new(AGENT_SEARCH, s(30)),
            Namespace::new(WORKFLOW_SEARCH, s(30)),
            Namespace::new(HTTP_EXECUTOR, s(1)),
            Namespace::new(HTTP_EXECUTOR_LAST_GOOD, s(1)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_max_is_bounded() {
        for (value, ok) in [("100", true), ("1", true), ("0", false), ("1001", false)] {
            let mut p = Parser::new();
            let raw = RawAgentsConfig {
                agents_bulk_max: Some(value.into()),
                ..Default::default()
            };
            let config = AgentsConfig::parse(&mut p, &raw);
            assert_eq!(p.finish(()).is_ok(), ok, "{value}");
            if ok {
                assert_eq!(config.bulk_max.to_string(), value);
            }
        }
    }

    #[test]
    fn a_heartbeat_timeout_must_outlast_two_heartbeats_and_zero_workers_is_allowed() {
        let mut p = Parser::new();
        let raw = RawAgentsConfig {
            agents_workers: Some("0".into()),
            agents_heartbeat_interval: Some("2s".into()),
            agents_heartbeat_timeout: Some("3s".into()),
            ..Default::default()
        };
        let config = AgentsConfig::parse(&mut p, &raw);
        assert_eq!(config.executions.workers, 0);
        let err = p.finish(()).unwrap_err().to_string();
        assert!(err.contains("AGENTS_HEARTBEAT_TIMEOUT"), "{err}");
        assert!(!err.contains("AGENTS_WORKERS"), "{err}");
    }
}
