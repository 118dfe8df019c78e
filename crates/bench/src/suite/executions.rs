//! The agents module's executions queue, end to end: executions enqueued through the module's
//! library API (`queue::enqueue_many`, [`PER_TRANSACTION`] per transaction, from
//! [`ENQUEUERS`] connections at once, each with its audit row and wake-up), claimed by
//! `cascade-bench worker` processes (the product's workers, built as `cascade worker` builds
//! them), run through the `echo` executor, and completed with their audit rows.
//!
//! Measured, from the rows themselves (PostgreSQL's clocks, not the suite's):
//! - executions/s with 1 and with 4 workers (one process): the run's executions over the time
//!   from the first enqueue to the last completion, the enqueues racing the workers; p50/p99
//!   are enqueue-to-completion;
//! - pickup latency (enqueue to `started_at`) with 4 workers, at a steady rate the workers
//!   keep up with, each enqueue its own transaction (so each wakes the workers);
//! - the same throughput run with two worker processes of 2 workers each, one of them
//!   SIGKILLed and restarted every [`kill_every`] while it runs: at the end every execution
//!   must have succeeded, and completed exactly once (one `execution.succeeded` audit row
//!   each), or the suite fails.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use cascade_agents::queries::Actor;
use cascade_agents::queue;
use serde_json::json;

use super::Suite;
use super::report::Row;
use super::spaces::connect;

/// Executions enqueued per transaction in the throughput runs.
const PER_TRANSACTION: usize = 50;
/// Connections enqueueing at once.
const ENQUEUERS: usize = 4;
/// The workers' settings in every run: claims rescued 2 s after their worker died, a retry
/// 100 ms after, so the kill run ends in seconds.
const WORKER_ENV: &[(&str, &str)] = &[
    ("AGENTS_HEARTBEAT_INTERVAL", "500ms"),
    ("AGENTS_HEARTBEAT_TIMEOUT", "2s"),
    ("AGENTS_RETRY_BACKOFF", "100ms"),
    ("AGENTS_MAX_ATTEMPTS", "10"),
    ("AGENTS_POLL_INTERVAL", "250ms"),
];

pub(super) async fn run(suite: &Suite) -> anyhow::Result<Vec<Row>> {
    let url = suite.pg.url();
    let sql = connect(&url).await?;
    let (owner, workflow): (i64, i64) = sql
        .query_one(
            "INSERT INTO workflows (owner_id, name, steps) \
             SELECT id, 'bench echo', '[{\"capability\": \"echo\", \"input\": {\"n\": 1}}]' \
             FROM cascade_users WHERE username = $1 RETURNING owner_id, id",
            &[&super::BENCH_ACCOUNT],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .context("the bench account's echo workflow")?;
    let queue = Queue {
        url,
        owner,
        workflow,
        work: suite.work.clone(),
    };
    let n = if suite.quick { 2_000 } else { 40_000 };
    let mut rows = Vec::new();
    for workers in [1, 4] {
        let mut process = queue.worker("workers", workers)?;
        queue.warm_up().await?;
        let run = queue.throughput(n).await?;
        process.stop();
        rows.push(run.row(&format!("executions end to end, {workers} worker(s)"), ""));
    }

    let mut process = queue.worker("workers", 4)?;
    queue.warm_up().await?;
    let (rate, seconds) = if suite.quick { (100, 2) } else { (200, 10) };
    let paced = queue.paced(rate, Duration::from_secs(seconds)).await?;
    process.stop();
    rows.push(paced.pickup_row(
        "executions pickup latency, 4 workers, one enqueue per transaction",
        rate,
    ));

    let kills = queue.with_kills(n, kill_every(suite.quick)).await?;
    rows.push(kills);
    Ok(rows)
}

/// Worker processes the kill run SIGKILLs even after the enqueues are over, if work is
/// still in flight.
const MIN_KILLS: usize = 2;

/// How often the kill run SIGKILLs a worker process.
fn kill_every(quick: bool) -> Duration {
    Duration::from_millis(if quick { 700 } else { 2_000 })
}

/// What a run needs: where, whose workflow, where the workers' logs go.
struct Queue {
    url: String,
    owner: i64,
    workflow: i64,
    work: std::path::PathBuf,
}

/// One run's executions (ids above `after`), as PostgreSQL recorded them.
struct Run {
    count: i64,
    /// First enqueue to last completion.
    span: Duration,
    complete_p50: f64,
    complete_p99: f64,
    pickup_p50: f64,
    pickup_p99: f64,
    /// Executions whose first attempt was not the one that succeeded.
    retried: i64,
}

impl Run {
    fn row(&self, scenario: &str, more: &str) -> Row {
        Row {
            scenario: scenario.to_string(),
            requests: self.count as u64,
            req_per_sec: self.count as f64 / self.span.as_secs_f64().max(1e-9),
            p50_ms: self.complete_p50,
            p99_ms: self.complete_p99,
            errors: 0,
            ratio_to_baseline: None,
            ratio_to_ceiling: None,
            notes: format!(
                "executions/s from the first enqueue to the last completion, racing the \
                 enqueues ({ENQUEUERS} connections, {PER_TRANSACTION} per transaction); \
                 p50/p99 enqueue to completion; pickup (enqueue to start) p50 {:.1} ms, \
                 p99 {:.1} ms{more}",
                self.pickup_p50, self.pickup_p99
            ),
        }
    }

    fn pickup_row(&self, scenario: &str, aim: u64) -> Row {
        Row {
            scenario: scenario.to_string(),
            requests: self.count as u64,
            req_per_sec: self.count as f64 / self.span.as_secs_f64().max(1e-9),
            p50_ms: self.pickup_p50,
            p99_ms: self.pickup_p99,
            errors: 0,
            ratio_to_baseline: None,
            ratio_to_ceiling: None,
            notes: format!(
                "p50/p99 enqueue to started_at, each enqueue its own transaction (woken by \
                 NOTIFY) from one connection, aiming at {aim}/s (executions/s: what it \
                 reached); enqueue to completion p99 {:.1} ms",
                self.complete_p99
            ),
        }
    }
}

/// A `cascade-bench worker` process; SIGKILLed on drop if still running.
struct WorkerProc {
    child: Child,
}

impl WorkerProc {
    /// SIGTERM, and waits for it to stop (its claims completed or given up).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILL: a crash, claims left behind.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Queue {
    fn worker(&self, name: &str, workers: usize) -> anyhow::Result<WorkerProc> {
        let log = self.work.join(format!("{name}.log"));
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("worker")
            .env("DATABASE_URL", &self.url)
            .env("AGENTS_WORKERS", workers.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(append(&log)?);
        for (key, value) in WORKER_ENV {
            command.env(key, value);
        }
        let child = command.spawn().context("starting cascade-bench worker")?;
        Ok(WorkerProc { child })
    }

    /// The newest execution's id: a run's executions are those above it.
    async fn last_id(&self, sql: &tokio_postgres::Client) -> anyhow::Result<i64> {
        Ok(sql
            .query_one("SELECT coalesce(max(id), 0) FROM executions", &[])
            .await?
            .get(0))
    }

    /// A few executions through, so the workers are up (connected, listening) before a
    /// measurement starts.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let sql = connect(&self.url).await?;
        let after = self.last_id(&sql).await?;
        self.enqueue(1, 20, 1).await?;
        self.settle(&sql, after, 20, Duration::from_secs(60))
            .await?;
        Ok(())
    }

    /// Enqueues `transactions × per` executions from [`ENQUEUERS`] connections, `per` in each
    /// transaction.
    async fn enqueue(
        &self,
        transactions: usize,
        per: usize,
        max_attempts: i32,
    ) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        for lane in 0..ENQUEUERS.min(transactions) {
            let (url, owner, workflow) = (self.url.clone(), self.owner, self.workflow);
            let mine = (lane..transactions).step_by(ENQUEUERS).count();
            tasks.push(tokio::spawn(async move {
                let mut sql = connect(&url).await?;
                let actor = Actor {
                    user_id: owner,
                    request_id: None,
                };
                let inputs: Vec<_> = (0..per).map(|i| json!({"i": i})).collect();
                for _ in 0..mine {
                    let tx = sql.transaction().await?;
                    queue::enqueue_many(&tx, &actor, workflow, &inputs, max_attempts)
                        .await
                        .map_err(|err| anyhow::anyhow!("enqueue: {err}"))?;
                    tx.commit().await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    }

    /// Waits until the `n` executions above `after` have all finished (at most `bound`).
    async fn settle(
        &self,
        sql: &tokio_postgres::Client,
        after: i64,
        n: i64,
        bound: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            // The live rows only (their partial indexes): cheap, so the polling costs the
            // measured PostgreSQL little.
            let live: i64 = sql
                .query_one(
                    "SELECT count(*) FROM executions WHERE id > $1 \
                     AND state IN ('queued', 'running')",
                    &[&after],
                )
                .await?
                .get(0);
            if live == 0 {
                let all: i64 = sql
                    .query_one("SELECT count(*) FROM executions WHERE id > $1", &[&after])
                    .await?
                    .get(0);
                ensure!(all >= n, "{all} executions found, {n} enqueued");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{live} of {n} executions unfinished after {bound:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The executions above `after`, measured; fails unless every one succeeded exactly once.
    async fn measured(&self, sql: &tokio_postgres::Client, after: i64) -> anyhow::Result<Run> {
        let row = sql
            .query_one(
                "SELECT count(*), \
                   extract(epoch FROM max(finished_at) - min(created_at))::float8, \
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))::float8, \
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))::float8, \
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))::float8, \
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))::float8, \
                   count(*) FILTER (WHERE attempt > 1), \
                   count(*) FILTER (WHERE state <> 'succeeded') \
                 FROM executions WHERE id > $1",
                &[&after],
            )
            .await?;
        let not_succeeded: i64 = row.get(7);
        ensure!(
            not_succeeded == 0,
            "{not_succeeded} execution(s) did not succeed"
        );
        let not_once: i64 = sql
            .query_one(
                "SELECT count(*) FROM executions e WHERE e.id > $1 AND ( \
                   SELECT count(*) FROM audit_log a WHERE a.entity_type = 'execution' \
                     AND a.entity_id = e.id::text AND a.action = 'execution.succeeded') <> 1",
                &[&after],
            )
            .await?
            .get(0);
        ensure!(
            not_once == 0,
            "{not_once} execution(s) not completed exactly once"
        );
        let secs = |i: usize| row.get::<_, Option<f64>>(i).unwrap_or(0.0);
        Ok(Run {
            count: row.get(0),
            span: Duration::from_secs_f64(secs(1).max(0.0)),
            complete_p50: secs(2) * 1000.0,
            complete_p99: secs(3) * 1000.0,
            pickup_p50: secs(4) * 1000.0,
            pickup_p99: secs(5) * 1000.0,
            retried: row.get(6),
        })
    }

    /// `n` executions enqueued as fast as the enqueuers go while the workers run them. Where
    /// pg_stat_statements is loaded, the run's costliest statements go to stderr (the
    /// profile the README quotes).
    async fn throughput(&self, n: usize) -> anyhow::Result<Run> {
        let sql = connect(&self.url).await?;
        let _ = sql.execute("SELECT pg_stat_statements_reset()", &[]).await;
        let after = self.last_id(&sql).await?;
        let transactions = n.div_ceil(PER_TRANSACTION);
        self.enqueue(transactions, PER_TRANSACTION, 1).await?;
        let total = (transactions * PER_TRANSACTION) as i64;
        self.settle(&sql, after, total, Duration::from_secs(600))
            .await?;
        let run = self.measured(&sql, after).await?;
        profile(&sql, run.count).await;
        Ok(run)
    }

    /// `rate` executions a second for `length`, each in its own transaction.
    async fn paced(&self, rate: u64, length: Duration) -> anyhow::Result<Run> {
        let sql = connect(&self.url).await?;
        let after = self.last_id(&sql).await?;
        let mut client = connect(&self.url).await?;
        let actor = Actor {
            user_id: self.owner,
            request_id: None,
        };
        let total = rate * length.as_secs();
        let begun = tokio::time::Instant::now();
        for i in 0..total {
            tokio::time::sleep_until(begun + Duration::from_secs_f64(i as f64 / rate as f64)).await;
            let tx = client.transaction().await?;
            queue::enqueue(&tx, &actor, self.workflow, &json!({"i": i}), 1)
                .await
                .map_err(|err| anyhow::anyhow!("enqueue: {err}"))?;
            tx.commit().await?;
        }
        self.settle(&sql, after, total as i64, Duration::from_secs(120))
            .await?;
        self.measured(&sql, after).await
    }

    /// The throughput run with two processes of two workers, one SIGKILLed and restarted
    /// every `every` until the enqueues are done.
    async fn with_kills(&self, n: usize, every: Duration) -> anyhow::Result<Row> {
        let sql = connect(&self.url).await?;
        let mut processes = [self.worker("kill-a", 2)?, self.worker("kill-b", 2)?];
        self.warm_up().await?;
        let after = self.last_id(&sql).await?;
        let transactions = n.div_ceil(PER_TRANSACTION);
        let enqueue = self.enqueue(transactions, PER_TRANSACTION, 10);
        tokio::pin!(enqueue);
        let mut kills = 0;
        let total = (transactions * PER_TRANSACTION) as i64;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut enqueued = false;
        loop {
            // The first kill as soon as there is work in flight (a quick run's enqueues are
            // over in a second), the others every `every`.
            let pause = if kills == 0 {
                Duration::from_millis(50)
            } else {
                every
            };
            if !enqueued {
                tokio::select! {
                    done = &mut enqueue => { done?; enqueued = true; }
                    () = tokio::time::sleep(pause) => {}
                }
            } else {
                tokio::time::sleep(pause).await;
            }
            let live: i64 = sql
                .query_one(
                    "SELECT count(*) FROM executions WHERE id > $1 AND state IN ('queued', 'running')",
                    &[&after],
                )
                .await?
                .get(0);
            if enqueued && live == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{live} executions still queued or running after 10 minutes of kills");
            }
            // Kill while there is work in flight: while the enqueues go on (so the run
            // ends), and up to MIN_KILLS times in all (a kill usually leaves claims to rescue,
            // work in flight for the next).
            if live > 0 && (!enqueued || kills < MIN_KILLS) {
                let victim = kills % 2;
                processes[victim].kill();
                kills += 1;
                processes[victim] = self.worker(&format!("kill-{victim}-{kills}"), 2)?;
            }
        }
        self.settle(&sql, after, total, Duration::from_secs(60))
            .await?;
        let run = self.measured(&sql, after).await?;
        for process in &mut processes {
            process.stop();
        }
        ensure!(kills > 0, "the run ended before any worker was killed");
        Ok(run.row(
            "executions with workers SIGKILLed, 2 × 2 workers",
            &format!(
                "; {kills} worker processes SIGKILLed and restarted (every {} ms), {} executions \
                 retried after a rescue; every execution succeeded, each completed once",
                every.as_millis(),
                run.retried
            ),
        ))
    }
}

fn append(path: &Path) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?)
}

/// The statements that cost the run most, per execution, from pg_stat_statements (nothing
/// when it is not loaded).
async fn profile(sql: &tokio_postgres::Client, executions: i64) {
    let Ok(rows) = sql
        .query(
            "SELECT calls, total_exec_time, rows, \
                    regexp_replace(left(query, 90), '\\s+', ' ', 'g') \
             FROM pg_stat_statements \
             WHERE query NOT LIKE '%pg_stat_statements%' \
             ORDER BY total_exec_time DESC LIMIT 8",
            &[],
        )
        .await
    else {
        return;
    };
    let per = executions.max(1) as f64;
    eprintln!(
        "bench: executions profile ({executions} executions): calls/execution, µs/execution, rows/call, statement"
    );
    for row in rows {
        let (calls, total, n, query): (i64, f64, i64, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        eprintln!(
            "bench:   {:.3} {:.1} {:.1} {query}",
            calls as f64 / per,
            total * 1000.0 / per,
            n as f64 / calls.max(1) as f64
        );
    }
}
