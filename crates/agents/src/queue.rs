//! The executions queue's SQL (table `executions`, `migrations/0002_workflows.sql`).
//!
//! An execution moves `queued → running → succeeded | failed | cancelled`; a failed attempt
//! with attempts left goes back to `queued` with a later `run_at` (exponential backoff).
//!
//! - [`enqueue`] (and [`enqueue_many`], many in three statements) runs in the caller's
//!   transaction (with its audit row and a `NOTIFY` that PostgreSQL delivers at commit): an
//!   execution exists exactly when the caller's write does.
//! - [`claim`] takes up to a batch of due executions with `FOR UPDATE SKIP LOCKED` and marks
//!   them as this worker's (`claimed_by`, `attempt + 1`), in one statement.
//! - [`heartbeat`] renews the worker's claims and says which are still its own.
//! - [`complete`] finishes a batch in one statement, **only where the claim is still the
//!   worker's** (same `claimed_by`, same `attempt`, still `running`): a worker whose claim
//!   was rescued cannot complete it too, so each execution is completed once.
//! - [`rescue`] requeues (or fails, at `max_attempts`; or cancels, when asked to) executions
//!   whose heartbeat lapsed.

use std::time::Duration;

use cascade_core::audit::{self, Change};
use cascade_core::db::Sql;
use serde_json::Value;
use tokio_postgres::Transaction;

use crate::error::AgentError;
use crate::queries::Actor;

/// The channel `enqueue` notifies and the workers' listener listens on.
pub const CHANNEL: &str = "cascade_executions";
/// The entity type of executions in the audit log.
pub const ENTITY: &str = "execution";
/// The actor of what the workers do.
pub const WORKER_ACTOR: &str = "system:executions";

/// An execution as every answer shows it, from `executions e`.
pub const EXECUTION_JSON: &str = "jsonb_build_object(\
    'id', e.id, 'workflow_id', e.workflow_id, 'state', e.state, 'input', e.input, \
    'attempt', e.attempt, 'max_attempts', e.max_attempts, \
    'cancel_requested', e.cancel_requested, 'result', e.result, 'error', e.error, \
    'created_at', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
    'run_at', to_char(e.run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
    'started_at', to_char(e.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
    'finished_at', to_char(e.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))";

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Enqueues an execution of `owner`'s workflow `workflow_id` in the caller's transaction, with
/// its audit row; workers are woken when the transaction commits. `None`: no such workflow of
/// the owner's.
pub async fn enqueue(
    tx: &Transaction<'_>,
    actor: &Actor,
    workflow_id: i64,
    input: &Value,
    max_attempts: i32,
) -> Result<Option<Value>, AgentError> {
    Ok(enqueue_many(
        tx,
        actor,
        workflow_id,
        std::slice::from_ref(input),
        max_attempts,
    )
    .await?
    .map(|mut executions| executions.swap_remove(0)))
}

/// Enqueues one execution of `owner`'s workflow `workflow_id` per input, in the caller's
/// transaction, in three statements whatever their number: the rows (with the wake-up, a
/// `NOTIFY` PostgreSQL delivers at commit, once per transaction), and their audit rows. The
/// executions in the order of `inputs`; `None`: no such workflow of the owner's.
pub async fn enqueue_many(
    tx: &Transaction<'_>,
    actor: &Actor,
    workflow_id: i64,
    inputs: &[Value],
    max_attempts: i32,
) -> Result<Option<Vec<Value>>, AgentError> {
    if inputs.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let rows = tx
        .query(
            &format!(
                "WITH e AS ( \
                   INSERT INTO executions (workflow_id, owner_id, steps, input, max_attempts) \
                   SELECT w.id, w.owner_id, w.steps, i.input, $4 \
                   FROM workflows w, UNNEST($3::jsonb[]) WITH ORDINALITY AS i(input, n) \
                   WHERE w.id = $1 AND w.owner_id = $2 AND w.deleted_at IS NULL \
                   ORDER BY i.n \
                   RETURNING *) \
                 SELECT {EXECUTION_JSON}, (SELECT pg_notify($5, '')) IS NULL FROM e ORDER BY e.id"
            ),
            &[
                &workflow_id,
                &actor.user_id,
                &inputs,
                &max_attempts,
                &CHANNEL,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let executions: Vec<Value> = rows.iter().map(|row| row.get(0)).collect();
    let ids: Vec<String> = executions.iter().map(|e| e["id"].to_string()).collect();
    let user = audit::user_actor(actor.user_id);
    let changes: Vec<Change<'_>> = executions
        .iter()
        .zip(&ids)
        .map(|(execution, id)| Change {
            actor: &user,
            action: "execution.enqueue",
            entity_type: ENTITY,
            entity_id: id,
            before: None,
            after: Some(execution),
            request_id: actor.request_id.as_deref(),
        })
        .collect();
    audit::record_many(tx, &changes).await?;
    Ok(Some(executions))
}

/// One of the owner's executions, or `None`.
pub async fn get(db: &impl Sql, owner: i64, id: i64) -> Result<Option<Value>, AgentError> {
    Ok(db
        .query_opt(
            &format!(
                "SELECT {EXECUTION_JSON} FROM executions e WHERE e.id = $1 AND e.owner_id = $2"
            ),
            &[&id, &owner],
        )
        .await?
        .map(|row| row.get(0)))
}

/// What cancelling did.
pub enum Cancelled {
    /// The execution as it is now: cancelled (it was queued), or marked to stop before its
    /// next step (it is running).
    Done(Value),
    /// It had finished already.
    Finished(Value),
    NotFound,
}

/// Cancels the owner's execution `id`: a queued one at once, a running one before its next
/// step (the worker sees `cancel_requested`).
pub async fn cancel(tx: &Transaction<'_>, actor: &Actor, id: i64) -> Result<Cancelled, AgentError> {
    let Some(row) = tx
        .query_opt(
            &format!(
                "SELECT e.state, {EXECUTION_JSON} FROM executions e \
                 WHERE e.id = $1 AND e.owner_id = $2 FOR UPDATE"
            ),
            &[&id, &actor.user_id],
        )
        .await?
    else {
        return Ok(Cancelled::NotFound);
    };
    let state: String = row.get(0);
    let before: Value = row.get(1);
    let sql = match state.as_str() {
        "queued" => {
            "UPDATE executions e SET state = 'cancelled', cancel_requested = true, \
                     error = 'cancelled before it started', finished_at = now() WHERE e.id = $1"
        }
        "running" => "UPDATE executions e SET cancel_requested = true WHERE e.id = $1",
        _ => return Ok(Cancelled::Finished(before)),
    };
    tx.execute(sql, &[&id]).await?;
    let after: Value = tx
        .query_one(
            &format!("SELECT {EXECUTION_JSON} FROM executions e WHERE e.id = $1"),
            &[&id],
        )
        .await?
        .get(0);
    audit::record(
        tx,
        &Change {
            actor: &audit::user_actor(actor.user_id),
            action: "execution.cancel",
            entity_type: ENTITY,
            entity_id: &id.to_string(),
            before: Some(&before),
            after: Some(&after),
            request_id: actor.request_id.as_deref(),
        },
    )
    .await?;
    Ok(Cancelled::Done(after))
}

/// An execution a worker claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub attempt: i32,
    pub steps: Value,
    pub input: Value,
    pub cancel_requested: bool,
}

/// Claims up to `batch` due executions for `worker`, among those whose every step names one
/// of `capabilities` (the worker's executors): a worker never claims what it cannot run, so an
/// instance without, say, the `http` executor leaves those executions to one that has it. An
/// execution no running worker can run stays queued (the `oldest queued` gauge shows it)
/// rather than failing on whichever instance saw it first.
pub async fn claim(
    db: &impl Sql,
    worker: &str,
    batch: i64,
    capabilities: &[String],
) -> Result<Vec<Claimed>, AgentError> {
    let rows = db
        .query(
            "WITH c AS ( \
               SELECT id FROM executions WHERE state = 'queued' AND run_at <= now() \
                 AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(steps) s \
                                 WHERE (s->>'capability') <> ALL ($3::text[]) \
                                    OR s->>'capability' IS NULL) \
               ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE executions e SET state = 'running', claimed_by = $1, heartbeat_at = now(), \
               attempt = e.attempt + 1, started_at = coalesce(e.started_at, now()) \
             FROM c WHERE e.id = c.id \
             RETURNING e.id, e.attempt, e.steps, e.input, e.cancel_requested",
            &[&worker, &batch, &capabilities],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Claimed {
            id: row.get(0),
            attempt: row.get(1),
            steps: row.get(2),
            input: row.get(3),
            cancel_requested: row.get(4),
        })
        .collect())
}

/// Renews `worker`'s claims on `ids`; returns the ids that are still its own.
pub async fn heartbeat(db: &impl Sql, worker: &str, ids: &[i64]) -> Result<Vec<i64>, AgentError> {
    let rows = db
        .query(
            "WITH l AS ( \
               SELECT id FROM executions \
               WHERE id = ANY($2) AND claimed_by = $1 AND state = 'running' \
               ORDER BY id FOR UPDATE) \
             UPDATE executions e SET heartbeat_at = now() FROM l \
             WHERE e.id = l.id AND e.claimed_by = $1 AND e.state = 'running' RETURNING e.id",
            &[&worker, &ids],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Whether the worker may run the next step of its claim: `None` when the claim is no longer
/// its own; `Some(true)` when a cancel was asked for.
pub async fn cancel_requested(
    db: &impl Sql,
    worker: &str,
    id: i64,
    attempt: i32,
) -> Result<Option<bool>, AgentError> {
    Ok(db
        .query_opt(
            "SELECT cancel_requested FROM executions \
             WHERE id = $1 AND claimed_by = $2 AND attempt = $3 AND state = 'running'",
            &[&id, &worker, &attempt],
        )
        .await?
        .map(|row| row.get(0)))
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    /// Retried after a backoff while attempts remain, else failed with this reason.
    Failed(String),
    /// Stopped between steps because a cancel was asked for.
    Cancelled,
}

/// An attempt to record.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: i64,
    pub attempt: i32,
    pub outcome: Outcome,
}

/// Records `finished` attempts of `worker`'s claims in one statement, with an audit row each,
/// in `tx`. Only claims that are still the worker's are changed; returns their ids.
/// A failure with attempts left is requeued `backoff × 2^(attempt-1)` later (at most an hour),
/// unless a cancel was asked for: then the execution is cancelled.
pub async fn complete(
    tx: &Transaction<'_>,
    worker: &str,
    finished: &[Finished],
    backoff: Duration,
) -> Result<Vec<i64>, AgentError> {
    if finished.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = finished.iter().map(|f| f.id).collect();
    let attempts: Vec<i32> = finished.iter().map(|f| f.attempt).collect();
    let outcomes: Vec<&str> = finished
        .iter()
        .map(|f| match f.outcome {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled => "cancelled",
        })
        .collect();
    let results: Vec<Option<&Value>> = finished
        .iter()
        .map(|f| match &f.outcome {
            Outcome::Succeeded(result) => Some(result),
            _ => None,
        })
        .collect();
    let errors: Vec<Option<&str>> = finished
        .iter()
        .map(|f| match &f.outcome {
            Outcome::Failed(reason) => Some(reason.as_str()),
            Outcome::Cancelled => Some("cancelled between steps"),
            Outcome::Succeeded(_) => None,
        })
        .collect();
    // Rows are locked in id order, as the heartbeat locks them: no deadlock between the two.
    tx.execute(
        "SELECT 1 FROM executions WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await?;
    let rows = tx
        .query(
            &format!(
                "WITH o AS ( \
                   SELECT * FROM UNNEST($2::int8[], $3::int4[], $4::text[], $5::jsonb[], $6::text[]) \
                     AS o(id, attempt, outcome, result, error)), \
                 e AS ( \
                   UPDATE executions e SET \
                     state = CASE WHEN o.outcome = 'failed' AND e.cancel_requested THEN 'cancelled' \
                                  WHEN o.outcome = 'failed' AND e.attempt < e.max_attempts \
                                  THEN 'queued' ELSE o.outcome END, \
                     run_at = CASE WHEN o.outcome = 'failed' AND NOT e.cancel_requested \
                                        AND e.attempt < e.max_attempts \
                                   THEN now() + make_interval(secs => least(3600, $7::float8 / 1000 * 2 ^ (e.attempt - 1))) \
                                   ELSE e.run_at END, \
                     finished_at = CASE WHEN o.outcome = 'failed' AND NOT e.cancel_requested \
                                        AND e.attempt < e.max_attempts \
                                        THEN NULL ELSE now() END, \
                     result = o.result, error = o.error, claimed_by = NULL, heartbeat_at = NULL \
                   FROM o \
                   WHERE e.id = o.id AND e.claimed_by = $1 AND e.attempt = o.attempt \
                     AND e.state = 'running' \
                   RETURNING e.*) \
                 SELECT e.id, e.state, {EXECUTION_JSON} FROM e ORDER BY e.id"
            ),
            &[&worker, &ids, &attempts, &outcomes, &results, &errors, &(ms(backoff) as f64)],
        )
        .await?;
    record_transitions(tx, &rows).await?;
    for row in &rows {
        let state = match row.get::<_, &str>(1) {
            "queued" => "retried",
            "succeeded" => "succeeded",
            "cancelled" => "cancelled",
            _ => "failed",
        };
        metrics::counter!(crate::worker::FINISHED, "state" => state).increment(1);
    }
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Audit rows of the workers' transitions: `(id, state, execution JSON)` rows.
async fn record_transitions(
    tx: &Transaction<'_>,
    rows: &[tokio_postgres::Row],
) -> Result<(), AgentError> {
    let records: Vec<(String, String, Value)> = rows
        .iter()
        .map(|row| {
            let id: i64 = row.get(0);
            let state: String = row.get(1);
            let action = match state.as_str() {
                "queued" => "execution.retry".to_string(),
                other => format!("execution.{other}"),
            };
            (id.to_string(), action, row.get(2))
        })
        .collect();
    let changes: Vec<Change<'_>> = records
        .iter()
        .map(|(id, action, after)| Change {
            actor: WORKER_ACTOR,
            action,
            entity_type: ENTITY,
            entity_id: id,
            before: None,
            after: Some(after),
            request_id: None,
        })
        .collect();
    audit::record_many(tx, &changes).await?;
    Ok(())
}

/// Takes back up to `limit` claims whose heartbeat is older than `timeout`: requeued after a
/// backoff, or failed with the reason when they used their last attempt. Returns how many.
pub async fn rescue(
    tx: &Transaction<'_>,
    timeout: Duration,
    backoff: Duration,
    limit: i64,
) -> Result<usize, AgentError> {
    let rows = tx
        .query(
            &format!(
                "WITH r AS ( \
                   SELECT id FROM executions \
                   WHERE state = 'running' AND heartbeat_at < now() - make_interval(secs => $1::float8 / 1000) \
                   ORDER BY heartbeat_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
                 e AS ( \
                   UPDATE executions e SET \
                     state = CASE WHEN e.cancel_requested THEN 'cancelled' \
                                  WHEN e.attempt >= e.max_attempts THEN 'failed' ELSE 'queued' END, \
                     error = format('worker %s stopped heartbeating during attempt %s of %s', \
                                    e.claimed_by, e.attempt, e.max_attempts), \
                     run_at = CASE WHEN e.cancel_requested OR e.attempt >= e.max_attempts THEN e.run_at \
                                   ELSE now() + make_interval(secs => least(3600, $2::float8 / 1000 * 2 ^ (e.attempt - 1))) END, \
                     finished_at = CASE WHEN e.cancel_requested OR e.attempt >= e.max_attempts THEN now() END, \
                     claimed_by = NULL, heartbeat_at = NULL \
                   FROM r WHERE e.id = r.id RETURNING e.*) \
                 SELECT e.id, e.state, {EXECUTION_JSON} FROM e ORDER BY e.id"
            ),
            &[&(ms(timeout) as f64), &(ms(backoff) as f64), &limit],
        )
        .await?;
    record_transitions(tx, &rows).await?;
    Ok(rows.len())
}

/// Deletes up to `limit` executions that finished more than `age` ago; returns how many.
pub async fn prune(db: &impl Sql, age: Duration, limit: i64) -> Result<u64, AgentError> {
    Ok(db
        .execute(
            "DELETE FROM executions WHERE id IN ( \
               SELECT id FROM executions \
               WHERE state IN ('succeeded', 'failed', 'cancelled') \
                 AND finished_at < now() - make_interval(secs => $1::float8 / 1000) \
               LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&(ms(age) as f64), &limit],
        )
        .await?)
}

/// Deletes executions that finished more than `age` ago, `batch` rows per statement (short
/// locks, short transactions), until one statement finds fewer (caught up) or `budget` is
/// spent; returns how many. Run every maintenance tick, it keeps up with any churn up to
/// `batch` rows per statement for as many statements as fit in `budget`.
pub async fn prune_due(
    db: &impl Sql,
    age: Duration,
    batch: i64,
    budget: Duration,
) -> Result<u64, AgentError> {
    let deadline = std::time::Instant::now() + budget;
    let mut total = 0;
    loop {
        let n = prune(db, age, batch).await?;
        total += n;
        if n < batch as u64 || std::time::Instant::now() >= deadline {
            return Ok(total);
        }
    }
}

/// The live part of the queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Depth {
    /// Exact up to [`DEPTH_EXACT_MAX`]; beyond, PostgreSQL's planner's estimate.
    pub queued: i64,
    /// Exact up to [`DEPTH_EXACT_MAX`]; beyond, PostgreSQL's planner's estimate.
    pub running: i64,
    /// How long the oldest due queued execution has waited; 0 when none is due.
    pub oldest_queued_seconds: f64,
}

/// Up to this many live executions of a state are counted exactly (an index-only walk of the
/// partial index, a few milliseconds); past it, the planner's estimate stands in, so reading
/// the depth never walks millions of index entries (`count(*)` at millions of rows is what
/// makes PostgreSQL queues' dashboards slow).
pub const DEPTH_EXACT_MAX: i64 = 100_000;

/// Counts the live states only (their partial indexes), bounded by [`DEPTH_EXACT_MAX`] each,
/// never the finished rows: cheap at any size of table or backlog.
pub async fn depth(db: &impl Sql) -> Result<Depth, AgentError> {
    let row = db
        .query_one(
            "SELECT \
               (SELECT count(*) FROM (SELECT 1 FROM executions WHERE state = 'queued' LIMIT $1) q), \
               (SELECT count(*) FROM (SELECT 1 FROM executions WHERE state = 'running' LIMIT $1) r), \
               coalesce(extract(epoch FROM now() - (SELECT min(run_at) FROM executions \
                 WHERE state = 'queued' AND run_at <= now()))::float8, 0)",
            &[&DEPTH_EXACT_MAX],
        )
        .await?;
    let mut queued: i64 = row.get(0);
    let mut running: i64 = row.get(1);
    if queued >= DEPTH_EXACT_MAX {
        queued = estimate(db, "queued").await?.max(DEPTH_EXACT_MAX);
    }
    if running >= DEPTH_EXACT_MAX {
        running = estimate(db, "running").await?.max(DEPTH_EXACT_MAX);
    }
    Ok(Depth {
        queued,
        running,
        oldest_queued_seconds: row.get(2),
    })
}

/// The planner's estimate of the executions in `state` (from the table's statistics, which
/// autovacuum's frequent ANALYZE of this table keeps recent).
async fn estimate(db: &impl Sql, state: &str) -> Result<i64, AgentError> {
    let plan: Value = db
        .query_one(
            &format!(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM executions WHERE state = '{}'",
                state.replace('\'', "")
            ),
            &[],
        )
        .await?
        .get(0);
    Ok(plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0) as i64)
}
