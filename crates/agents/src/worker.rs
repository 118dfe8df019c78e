//! The workers: `AGENTS_WORKERS` per instance (inside `cascade serve`), each a loop that
//! claims a batch of what its [`Executors`] can run ([`queue::claim`]), runs the claimed
//! executions' steps concurrently while a heartbeat renews the claims, and completes each as
//! it finishes, those finishing within 5 ms of each other in one statement
//! ([`queue::complete`]). A completion that cannot be written (PostgreSQL away) is
//! retried, heartbeats going on meanwhile, for up to five minutes, so an outage delays
//! executions but does not run them again; one PostgreSQL rejects (bad data) is written
//! execution by execution, the offending one failed. Step outputs are checked before: one
//! with a NUL character or over [`MAX_STEP_OUTPUT`] bytes (or a result over [`MAX_RESULT`])
//! fails its execution. A worker that dies leaves claims whose heartbeat lapses, and the
//! maintenance task requeues them ([`queue::rescue`]) for another attempt.
//!
//! Wake-ups: one listener per instance (`LISTEN cascade_executions` on a connection of its
//! own, to `DATABASE_DIRECT_URL` behind PgBouncer) wakes the idle workers when an enqueue
//! commits; without it (`AGENTS_LISTEN=false`) or while it is reconnecting, workers poll every
//! `AGENTS_POLL_INTERVAL`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_core::db::Db;
use cascade_core::shutdown::ShutdownSignal;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use crate::config::ExecutionsConfig;
use crate::executor::{Executors, Step};
use crate::queue::{self, Claimed, Finished, Outcome};

/// Executions completed by this instance's workers (any final state, or requeued for a retry).
pub const COMPLETED: &str = "cascade_executions_completed_total";
/// Claims taken back from a worker that stopped heartbeating.
pub const RESCUED: &str = "cascade_executions_rescued_total";

/// Executions waiting, being run, and how long the oldest due one has waited (seconds), as of
/// the last maintenance tick of this instance (every `AGENTS_HEARTBEAT_INTERVAL`).
pub const QUEUED: &str = "cascade_executions_queued";
pub const RUNNING: &str = "cascade_executions_running";
pub const OLDEST_QUEUED: &str = "cascade_executions_oldest_queued_seconds";
/// Completed attempts by the state they left the execution in (label `state`).
pub const FINISHED: &str = "cascade_executions_finished_total";
/// The values of [`FINISHED`]'s `state` label (`retried`: a failed attempt requeued).
pub const FINISHED_STATES: [&str; 4] = ["succeeded", "failed", "cancelled", "retried"];

/// Registers the workers' metrics' help texts, and zeroes so they are on `/metrics` at once.
pub fn describe_metrics() {
    metrics::describe_counter!(
        COMPLETED,
        "Execution attempts completed by this instance's workers (succeeded, failed, cancelled, or requeued for a retry)"
    );
    metrics::describe_counter!(
        RESCUED,
        "Executions taken back from a worker that stopped heartbeating (requeued, or failed at their last attempt)"
    );
    metrics::describe_gauge!(
        QUEUED,
        "Executions queued (due or waiting out a retry's backoff)"
    );
    metrics::describe_gauge!(RUNNING, "Executions claimed by a worker");
    metrics::describe_gauge!(
        OLDEST_QUEUED,
        "How long the oldest due queued execution has waited, in seconds (0: none)"
    );
    metrics::describe_counter!(
        FINISHED,
        "Execution attempts completed by this instance's workers, by the state they left the execution in (retried: requeued after a failure)"
    );
    metrics::counter!(COMPLETED).increment(0);
    metrics::counter!(RESCUED).increment(0);
    for state in FINISHED_STATES {
        metrics::counter!(FINISHED, "state" => state).increment(0);
    }
}

/// What every worker of an instance shares.
#[derive(Clone)]
pub struct Workers {
    pub db: Db,
    pub config: ExecutionsConfig,
    pub executors: Executors,
    /// Woken by the listener when an enqueue committed.
    pub wake: Arc<Notify>,
    /// The capabilities of `executors`: what the workers claim ([`queue::claim`]).
    pub capabilities: Arc<[String]>,
}

/// A worker's name in `claimed_by`: the instance's prefix and the worker's number.
pub fn worker_name(instance: &str, n: usize) -> String {
    format!("{instance}-{n}")
}

impl Workers {
    /// One worker's loop, until `stop`.
    pub async fn run(self, name: String, mut stop: ShutdownSignal) {
        let mut pause = Duration::from_millis(100);
        loop {
            if stop.is_triggered() {
                return;
            }
            // Armed before the claim, so an enqueue that commits after the claim saw nothing
            // still wakes this worker.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let claimed = match self.claim(&name).await {
                Ok(claimed) => {
                    pause = Duration::from_millis(100);
                    claimed
                }
                Err(err) => {
                    tracing::warn!(worker = %name, error = %err, "claiming executions failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = stop.recv() => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if claimed.is_empty() {
                tokio::select! {
                    () = &mut woken => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = stop.recv() => return,
                }
                continue;
            }
            self.work(&name, claimed, &stop).await;
        }
    }

    async fn claim(&self, name: &str) -> Result<Vec<Claimed>, crate::AgentError> {
        let conn = self.db.conn().await?;
        queue::claim(&conn, name, self.config.batch, &self.capabilities).await
    }

    /// Runs a claimed batch, heartbeating the claims meanwhile. Executions are completed as
    /// they finish, not when the batch's slowest does: what finishes within
    /// [`COMPLETE_WINDOW`] of the first unwritten outcome is written in one statement, while
    /// the rest keep running.
    async fn work(&self, name: &str, claimed: Vec<Claimed>, stop: &ShutdownSignal) {
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        let lost: Arc<Mutex<HashSet<i64>>> = Arc::default();
        let heartbeat = self.heartbeat(name, &ids, &lost);
        let (done, mut outcomes) = tokio::sync::mpsc::unbounded_channel::<Finished>();
        let run = async {
            // Moved in: the channel closes when the last execution has finished.
            let done = done;
            let mut runs: FuturesUnordered<_> = claimed
                .iter()
                .map(|c| self.execute(name, c, &lost))
                .collect();
            while let Some(finished) = runs.next().await {
                if let Some(finished) = finished {
                    // The receiver lives until every sender is gone.
                    let _ = done.send(finished);
                }
            }
        };
        let write = async {
            while let Some(first) = outcomes.recv().await {
                let mut batch = vec![first];
                let window = tokio::time::Instant::now() + COMPLETE_WINDOW;
                while let Ok(Some(more)) = tokio::time::timeout_at(window, outcomes.recv()).await {
                    batch.push(more);
                }
                self.complete(name, &batch, stop).await;
            }
        };
        tokio::select! {
            ((), ()) = async { tokio::join!(run, write) } => {}
            () = heartbeat => {}
        }
    }

    /// Renews the claims every `AGENTS_HEARTBEAT_INTERVAL`; a claim found rescued is marked
    /// lost (its remaining steps are not run). Never returns.
    async fn heartbeat(&self, name: &str, ids: &[i64], lost: &Mutex<HashSet<i64>>) {
        loop {
            tokio::time::sleep(self.config.heartbeat_interval).await;
            let renewed = async {
                let conn = self.db.conn().await?;
                queue::heartbeat(&conn, name, ids).await
            };
            match renewed.await {
                Ok(mine) => {
                    let mine: HashSet<i64> = mine.into_iter().collect();
                    let mut lost = lost.lock().unwrap_or_else(|e| e.into_inner());
                    lost.extend(ids.iter().filter(|id| !mine.contains(id)));
                }
                Err(err) => {
                    tracing::warn!(worker = %name, error = %err, "heartbeat failed; retrying")
                }
            }
        }
    }

    /// Runs one execution's steps in order; `None` when its claim was lost on the way.
    async fn execute(
        &self,
        name: &str,
        claimed: &Claimed,
        lost: &Mutex<HashSet<i64>>,
    ) -> Option<Finished> {
        let finished = |outcome| {
            Some(Finished {
                id: claimed.id,
                attempt: claimed.attempt,
                outcome: match outcome {
                    Outcome::Failed(reason) => Outcome::Failed(clean_reason(&reason)),
                    other => other,
                },
            })
        };
        if claimed.cancel_requested {
            return finished(Outcome::Cancelled);
        }
        let steps = claimed.steps.as_array().cloned().unwrap_or_default();
        let mut outputs = Vec::with_capacity(steps.len());
        let mut previous = Value::Null;
        let mut total = 0usize;
        for (index, step) in steps.iter().enumerate() {
            if lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&claimed.id)
            {
                return None;
            }
            if index > 0 {
                // Cancel is honoured between steps; a claim rescued meanwhile is dropped.
                match self.cancel_requested(name, claimed).await {
                    Some(false) => {}
                    Some(true) => return finished(Outcome::Cancelled),
                    None => return None,
                }
            }
            let capability = step["capability"].as_str().unwrap_or_default();
            let Some(executor) = self.executors.get(capability) else {
                return finished(Outcome::Failed(format!(
                    "step {index}: no executor for capability {capability:?} on this server"
                )));
            };
            let input = Step {
                execution_id: claimed.id,
                index,
                attempt: claimed.attempt,
                input: step["input"].clone(),
                execution_input: claimed.input.clone(),
                previous: previous.clone(),
            };
            // A panicking executor fails its step, not the worker (which would leave the batch
            // to the rescue and run one worker fewer from then on).
            let run = std::panic::AssertUnwindSafe(executor.run(&input)).catch_unwind();
            match tokio::time::timeout(self.config.step_timeout, run).await {
                Ok(Ok(Ok(output))) => {
                    if let Err(reason) = storable(&output, MAX_STEP_OUTPUT) {
                        return finished(Outcome::Failed(format!("step {index}: {reason}")));
                    }
                    total += serialized_len(&output);
                    if total > MAX_RESULT {
                        return finished(Outcome::Failed(format!(
                            "step {index}: the execution's result exceeds {MAX_RESULT} bytes"
                        )));
                    }
                    previous = output.clone();
                    outputs.push(output);
                }
                Ok(Ok(Err(reason))) => {
                    return finished(Outcome::Failed(format!("step {index}: {reason}")));
                }
                Ok(Err(_panic)) => {
                    return finished(Outcome::Failed(format!(
                        "step {index}: the {capability:?} executor panicked"
                    )));
                }
                Err(_) => {
                    return finished(Outcome::Failed(format!(
                        "step {index}: no answer within AGENTS_STEP_TIMEOUT"
                    )));
                }
            }
        }
        finished(Outcome::Succeeded(Value::Array(outputs)))
    }

    /// Whether a cancel was asked for (`None`: the claim is no longer this worker's). While
    /// PostgreSQL cannot answer, asks again (the attempt is not failed for an outage, which
    /// would run its steps again) for up to the heartbeat timeout, after which the claim may
    /// have been rescued: then it gives the claim up.
    async fn cancel_requested(&self, name: &str, claimed: &Claimed) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + self.config.heartbeat_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let asked = async {
                let conn = self.db.conn().await?;
                queue::cancel_requested(&conn, name, claimed.id, claimed.attempt).await
            };
            match asked.await {
                Ok(answer) => return answer,
                Err(err) if tokio::time::Instant::now() + pause < deadline => {
                    tracing::warn!(worker = %name, error = %err, "checking for a cancel failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(err) => {
                    tracing::warn!(worker = %name, error = %err, "giving up a claim that cannot be checked");
                    return None;
                }
            }
        }
    }

    /// Writes the batch's outcomes. A batch PostgreSQL rejects for good (bad data: SQLSTATE
    /// classes 22, 23, 54) is written execution by execution, and an execution whose outcome
    /// is rejected is failed with the reason instead, so one bad result never holds up the
    /// batch. A write that fails otherwise (PostgreSQL away) is retried, heartbeats going on,
    /// for up to [`COMPLETE_PATIENCE`]; then, or on shutdown, it is given up (the claims are
    /// rescued after the heartbeat timeout).
    async fn complete(&self, name: &str, finished: &[Finished], stop: &ShutdownSignal) {
        if finished.is_empty() {
            return;
        }
        let Some(err) = self.write(name, finished, stop).await else {
            return;
        };
        tracing::warn!(worker = %name, error = %err, "PostgreSQL rejected the batch's outcomes; writing them one by one");
        for one in finished {
            let Some(err) = self.write(name, std::slice::from_ref(one), stop).await else {
                continue;
            };
            tracing::warn!(worker = %name, execution = one.id, error = %err, "PostgreSQL rejected an execution's outcome; failing it");
            let failed = Finished {
                id: one.id,
                attempt: one.attempt,
                outcome: Outcome::Failed(clean_reason(&format!(
                    "its outcome could not be stored: {err}"
                ))),
            };
            if let Some(err) = self.write(name, &[failed], stop).await {
                tracing::error!(worker = %name, execution = one.id, error = %err, "cannot record an execution's failure; leaving it to the rescue");
            }
        }
    }

    /// Writes `finished` in one transaction, retrying transient failures (see
    /// [`Workers::complete`]). `Some(error)` only when PostgreSQL rejected the data for good.
    async fn write(
        &self,
        name: &str,
        finished: &[Finished],
        stop: &ShutdownSignal,
    ) -> Option<crate::AgentError> {
        let deadline = tokio::time::Instant::now() + COMPLETE_PATIENCE;
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = async {
                let mut conn = self.db.conn().await?;
                let tx = conn.transaction().await.map_err(crate::AgentError::from)?;
                let done = queue::complete(&tx, name, finished, self.config.retry_backoff).await?;
                tx.commit().await.map_err(crate::AgentError::from)?;
                Ok::<_, crate::AgentError>(done)
            };
            match attempt.await {
                Ok(done) => {
                    metrics::counter!(COMPLETED).increment(done.len() as u64);
                    return None;
                }
                Err(err) if rejected_data(&err) => return Some(err),
                Err(err) => {
                    if stop.is_triggered() || tokio::time::Instant::now() + pause > deadline {
                        tracing::error!(worker = %name, error = %err, "completing executions failed; giving them up to the rescue");
                        return None;
                    }
                    tracing::warn!(worker = %name, error = %err, "completing executions failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The most a step's output may take, serialized: a larger one fails the step.
pub const MAX_STEP_OUTPUT: usize = 1024 * 1024;
/// The most an execution's result (all its steps' outputs) may take, serialized.
pub const MAX_RESULT: usize = 4 * 1024 * 1024;
/// The most of a failure's reason that is stored.
const MAX_REASON: usize = 8 * 1024;
/// How long a finished execution may wait for others of its batch to be written with it: a
/// few milliseconds turn hundreds of completions into a handful of statements without holding
/// any of them up noticeably.
const COMPLETE_WINDOW: Duration = Duration::from_millis(5);
/// Finished executions deleted per statement by the pruning.
const PRUNE_BATCH: i64 = 5000;
/// How long a completion is retried while PostgreSQL cannot take it.
const COMPLETE_PATIENCE: Duration = Duration::from_secs(300);

fn serialized_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Whether PostgreSQL can store `output` (no NUL character, which JSONB rejects) within `max`
/// bytes; else why not.
fn storable(output: &Value, max: usize) -> Result<(), String> {
    if has_nul(output) {
        return Err("the output contains a NUL character (\\u0000), which cannot be stored".into());
    }
    let len = serialized_len(output);
    if len > max {
        return Err(format!(
            "the output takes {len} bytes, more than the {max} allowed"
        ));
    }
    Ok(())
}

/// A failure's reason as it can be stored: NUL characters shown as `\u0000`, at most
/// [`MAX_REASON`] bytes.
fn clean_reason(reason: &str) -> String {
    let mut clean = reason.replace('\0', "\\u0000");
    if clean.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
        clean.push_str("… (truncated)");
    }
    clean
}

/// Whether PostgreSQL rejected the data itself (SQLSTATE classes 22 data exception, 23
/// integrity constraint violation, 54 program limit exceeded): writing it again cannot help.
fn rejected_data(err: &crate::AgentError) -> bool {
    let crate::AgentError::Db(cascade_core::db::DbError::Query(err)) = err else {
        return false;
    };
    err.code()
        .is_some_and(|code| matches!(&code.code()[..2], "22" | "23" | "54"))
}

/// Rescues lapsed claims and prunes old executions every `AGENTS_HEARTBEAT_INTERVAL`, until
/// `stop`. Every instance runs it; `SKIP LOCKED` keeps two from taking the same rows.
pub async fn maintain(db: Db, config: ExecutionsConfig, mut stop: ShutdownSignal) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(config.heartbeat_interval) => {}
            () = stop.recv() => return,
        }
        let rescued = async {
            let mut conn = db.conn().await?;
            let tx = conn.transaction().await.map_err(crate::AgentError::from)?;
            let n =
                queue::rescue(&tx, config.heartbeat_timeout, config.retry_backoff, 1000).await?;
            tx.commit().await.map_err(crate::AgentError::from)?;
            Ok::<_, crate::AgentError>(n)
        };
        match rescued.await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!(RESCUED).increment(n as u64);
                tracing::info!(
                    rescued = n,
                    "requeued executions whose worker stopped heartbeating"
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "rescuing executions failed; the next tick retries")
            }
        }
        let depth = async {
            let conn = db.conn().await?;
            queue::depth(&conn).await
        };
        match depth.await {
            Ok(depth) => {
                metrics::gauge!(QUEUED).set(depth.queued as f64);
                metrics::gauge!(RUNNING).set(depth.running as f64);
                metrics::gauge!(OLDEST_QUEUED).set(depth.oldest_queued_seconds);
            }
            Err(err) => tracing::debug!(error = %err, "reading the queue's depth failed"),
        }
        // Pruning runs every tick, in statements of PRUNE_BATCH rows, until it has caught up
        // or spent half the tick: it keeps up with churn of up to PRUNE_BATCH rows per
        // statement for as many statements as fit, and one statement's locks stay short.
        if let Some(age) = config.retention {
            let pruned = async {
                let conn = db.conn().await?;
                queue::prune_due(&conn, age, PRUNE_BATCH, config.heartbeat_interval / 2).await
            };
            match pruned.await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(
                    pruned = n,
                    "deleted finished executions past AGENTS_EXECUTIONS_RETENTION"
                ),
                Err(err) => tracing::warn!(error = %err, "pruning executions failed"),
            }
        }
    }
}

/// The instance's listener: `LISTEN cascade_executions` on a connection of its own, waking the
/// workers on each notification; reconnects after a failure (the workers poll meanwhile).
pub async fn listen(db: Db, wake: Arc<Notify>, mut stop: ShutdownSignal) {
    let mut pause = Duration::from_millis(200);
    loop {
        let ended = async {
            let (client, mut connection) = db.maintenance_config().connect(db.tls()).await?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
            let driver = tokio::spawn(async move {
                while let Some(message) =
                    std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => {
                            if tx.send(()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {}", queue::CHANNEL))
                .await?;
            // Anything enqueued while no one listened is found by this wake-up's claim.
            wake.notify_waiters();
            loop {
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(()) => wake.notify_waiters(),
                        None => break,
                    },
                    () = stop.recv() => {
                        driver.abort();
                        return Ok(true);
                    }
                }
            }
            Ok::<bool, tokio_postgres::Error>(false)
        };
        match ended.await {
            Ok(true) => return,
            Ok(false) => tracing::warn!("the executions listener's connection ended; reconnecting"),
            Err(err) => {
                tracing::warn!(error = %err, "the executions listener cannot connect; workers poll meanwhile")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.recv() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
