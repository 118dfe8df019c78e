//! The interaction log (seed 001's optional MongoDB collection, kept in PostgreSQL): what an
//! account did (linked or unlinked a citizen, viewed a pattern), in table `interactions`
//! (migration app/3), written off the request path.
//!
//! - [`Interactions::record`] never waits and never fails: it appends to a bounded in-memory
//!   buffer (`INTERACTIONS_BUFFER`) and returns. A full buffer drops the interaction and
//!   counts it (`cascade_interactions_dropped_total{reason="buffer_full"}`): a request is
//!   never slowed by the log, whatever PostgreSQL is doing.
//! - One writer per instance ([`Interactions::run_writer`], under the supervisor) takes up to
//!   `INTERACTIONS_BATCH` rows, as soon as that many wait and otherwise every
//!   `INTERACTIONS_FLUSH_INTERVAL`, and writes them with one `INSERT … SELECT FROM UNNEST`.
//!   While PostgreSQL is unavailable it retries the batch in hand with jittered exponential
//!   backoff (at most [`RETRY_MAX_DELAY`] apart); meanwhile the buffer fills and then drops,
//!   so memory stays bounded by the buffer plus one batch. A batch PostgreSQL refuses for what
//!   it holds (not an outage) is dropped and counted, not retried forever. On shutdown the
//!   writer writes what is buffered for at most [`SHUTDOWN_FLUSH`]; the rest is counted as
//!   dropped.
//! - Every row's id is chosen here, so a batch retried after an answer that never came is not
//!   written twice (`ON CONFLICT (id) DO NOTHING`); `created_at` is when the interaction
//!   happened, not when its batch was written.
//! - [`run_retention`] deletes rows older than `INTERACTIONS_RETENTION` every
//!   `INTERACTIONS_SWEEP_INTERVAL`, [`RETENTION_BATCH`] rows per statement, so a large
//!   backlog never becomes one long transaction.
//! - `GET /me/interactions` ([`mine`]): the caller's own, newest first, paged by cursor.
//!
//! The log is a record of use, best effort by design: losing some of it under an outage is
//! the price of never making a request wait for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use cascade_core::db::{Db, DbError};
use cascade_core::metrics::{self, InteractionDrop};
use cascade_core::retry::Backoff;
use cascade_core::shutdown::ShutdownSignal;
use cascade_http::{ApiError, CurrentUser};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::AppModuleState;
use crate::config::InteractionsConfig;

/// How long the writer keeps writing what is buffered once shutdown is signalled (the
/// supervisor waits 10 s for all tasks).
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// The longest wait between two attempts to write a batch while PostgreSQL is unavailable.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
/// Rows deleted by one retention statement.
pub const RETENTION_BATCH: i64 = 5_000;

/// What an interaction was (the `interaction_type` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InteractionKind {
    /// `POST /me/citizen` linked the account to a citizen.
    CitizenLink,
    /// `DELETE /me/citizen` removed the account's link.
    CitizenUnlink,
    /// The account read a consciousness pattern.
    PatternView,
}

impl InteractionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InteractionKind::CitizenLink => "citizen_link",
            InteractionKind::CitizenUnlink => "citizen_unlink",
            InteractionKind::PatternView => "pattern_view",
        }
    }
}

/// One recorded interaction, waiting to be written.
struct Interaction {
    id: Uuid,
    user_id: i64,
    kind: InteractionKind,
    data: Value,
    /// When it happened, microseconds since the Unix epoch.
    at_us: i64,
}

/// The recorder: a cheap handle, cloned into the handlers and the writer task.
#[derive(Clone)]
pub struct Interactions {
    inner: Arc<Inner>,
}

struct Inner {
    /// A `std` mutex: held for one push or one drain, never across an `.await`.
    buffer: Mutex<VecDeque<Interaction>>,
    capacity: usize,
    batch: usize,
    /// Wakes the writer as soon as a whole batch waits.
    batch_ready: Notify,
    /// Row ids are this instance's random 64 bits and a counter: unique across instances
    /// without a random draw per interaction.
    id_prefix: u64,
    next_id: AtomicU64,
}

impl Interactions {
    pub fn new(config: &InteractionsConfig) -> Interactions {
        Interactions {
            inner: Arc::new(Inner {
                buffer: Mutex::new(VecDeque::new()),
                capacity: config.buffer.max(1),
                batch: config.batch.max(1),
                batch_ready: Notify::new(),
                id_prefix: Uuid::new_v4().as_u64_pair().0,
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Records that `user_id` did `kind` (details in `data`, a JSON object). Returns at once;
    /// the row is written within about `INTERACTIONS_FLUSH_INTERVAL`, or dropped and counted
    /// when `INTERACTIONS_BUFFER` interactions are already waiting.
    pub fn record(&self, user_id: i64, kind: InteractionKind, data: Value) {
        let inner = &self.inner;
        let at_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let id = Uuid::from_u64_pair(
            inner.id_prefix,
            inner.next_id.fetch_add(1, Ordering::Relaxed),
        );
        let waiting = {
            let mut buffer = self.lock();
            if buffer.len() >= inner.capacity {
                drop(buffer);
                metrics::record_interactions_dropped(InteractionDrop::BufferFull, 1);
                return;
            }
            buffer.push_back(Interaction {
                id,
                user_id,
                kind,
                data,
                at_us,
            });
            buffer.len()
        };
        if waiting == inner.batch {
            inner.batch_ready.notify_one();
        }
    }

    /// Interactions waiting to be written.
    pub fn buffered(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Interaction>> {
        // A panic while holding it cannot leave the queue half-changed (push and drain are
        // single calls), so a poisoned lock is still a usable queue.
        self.inner.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to one batch, oldest first.
    fn take(&self) -> Vec<Interaction> {
        let mut buffer = self.lock();
        let n = buffer.len().min(self.inner.batch);
        buffer.drain(..n).collect()
    }

    /// The writer task: writes what is recorded, in batches, until `stop`; then flushes.
    pub async fn run_writer(self, db: Db, flush_interval: Duration, mut stop: ShutdownSignal) {
        let mut tick = tokio::time::interval(flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unwritten = Vec::new();
        loop {
            tokio::select! {
                () = stop.recv() => break,
                _ = tick.tick() => {}
                () = self.inner.batch_ready.notified() => {}
            }
            if let Err(batch) = self.write_buffered(&db, &mut stop).await {
                unwritten = batch;
                break;
            }
        }
        self.flush_on_shutdown(&db, unwritten).await;
    }

    /// Writes batches until less than a whole batch was waiting, or shutdown came. `Err`
    /// with the batch in hand when `stop` came while PostgreSQL was unavailable.
    async fn write_buffered(
        &self,
        db: &Db,
        stop: &mut ShutdownSignal,
    ) -> Result<(), Vec<Interaction>> {
        loop {
            let batch = self.take();
            if batch.is_empty() {
                metrics::record_interactions_buffered(0);
                return Ok(());
            }
            let whole = batch.len() == self.inner.batch;
            self.write_retrying(db, batch, stop).await?;
            // Under a steady stream there is always another whole batch: shutdown must still
            // reach the flush, which writes the rest under its bound.
            if !whole || stop.is_triggered() {
                return Ok(());
            }
        }
    }

    /// Writes `batch`, retrying while PostgreSQL is unavailable, until it is written or
    /// refused (`Ok`), or `stop` comes (`Err` with the batch).
    async fn write_retrying(
        &self,
        db: &Db,
        batch: Vec<Interaction>,
        stop: &mut ShutdownSignal,
    ) -> Result<(), Vec<Interaction>> {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max_delay: RETRY_MAX_DELAY,
            total: Duration::MAX,
        };
        let mut attempt = 0u32;
        loop {
            match self.write_once(db, &batch).await {
                Ok(()) => return Ok(()),
                Err(Failure::Refused) => return Ok(()),
                Err(Failure::Unavailable(why)) => {
                    if attempt == 0 {
                        tracing::warn!(
                            rows = batch.len(),
                            error = why,
                            "interaction log: PostgreSQL is unavailable; retrying the batch (new interactions wait in memory, up to INTERACTIONS_BUFFER)"
                        );
                    }
                    metrics::record_interactions_buffered(self.buffered());
                    tokio::select! {
                        () = stop.recv() => return Err(batch),
                        () = tokio::time::sleep(backoff.delay(attempt)) => {}
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// One attempt at one batch; counts what it wrote or dropped.
    async fn write_once(&self, db: &Db, batch: &[Interaction]) -> Result<(), Failure> {
        match insert(db, batch).await {
            Ok(()) => {
                metrics::record_interactions_written(batch.len() as u64, self.buffered());
                Ok(())
            }
            Err(err) if retryable(&err) => Err(Failure::Unavailable(err.to_string())),
            Err(err) => {
                tracing::error!(
                    rows = batch.len(),
                    error = %err,
                    "interaction log: PostgreSQL refused a batch; dropped"
                );
                metrics::record_interactions_dropped(InteractionDrop::Refused, batch.len() as u64);
                Err(Failure::Refused)
            }
        }
    }

    /// On shutdown: `unwritten` and what is buffered, one attempt per batch, for at most
    /// [`SHUTDOWN_FLUSH`]; what is left is counted as dropped.
    async fn flush_on_shutdown(&self, db: &Db, unwritten: Vec<Interaction>) {
        let flush = async {
            let mut batch = unwritten;
            loop {
                if batch.is_empty() {
                    batch = self.take();
                }
                if batch.is_empty() {
                    return Ok(());
                }
                match self.write_once(db, &batch).await {
                    Ok(()) | Err(Failure::Refused) => batch.clear(),
                    Err(Failure::Unavailable(_)) => return Err(batch.len()),
                }
            }
        };
        let left = match tokio::time::timeout(SHUTDOWN_FLUSH, flush).await {
            Ok(Ok(())) => 0,
            Ok(Err(in_hand)) => in_hand + self.buffered(),
            // The batch being written when the bound ran out is not known to be written.
            Err(_) => self.buffered() + 1,
        };
        if left > 0 {
            tracing::warn!(
                lost = left,
                "interaction log: not written before shutdown (PostgreSQL unavailable or too slow)"
            );
            metrics::record_interactions_dropped(InteractionDrop::Shutdown, left as u64);
        }
    }
}

enum Failure {
    /// PostgreSQL could not be used (down, restarting, a timeout): worth retrying.
    Unavailable(String),
    /// PostgreSQL refused the batch for what it holds: dropped and counted.
    Refused,
}

/// Whether a failed write may succeed later unchanged: PostgreSQL was unreachable, or the
/// statement was cancelled (`statement_timeout`, e.g. behind a lock), or lost a deadlock.
fn retryable(err: &DbError) -> bool {
    if err.is_unavailable() {
        return true;
    }
    match err {
        DbError::Query(query) => query.code().is_some_and(|code| {
            [
                SqlState::QUERY_CANCELED,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::TOO_MANY_CONNECTIONS,
            ]
            .contains(code)
        }),
        _ => false,
    }
}

/// One statement for the whole batch. Rows of accounts deleted meanwhile are skipped (the
/// foreign key would refuse the batch).
async fn insert(db: &Db, batch: &[Interaction]) -> Result<(), DbError> {
    let ids: Vec<Uuid> = batch.iter().map(|i| i.id).collect();
    let users: Vec<i64> = batch.iter().map(|i| i.user_id).collect();
    let kinds: Vec<&str> = batch.iter().map(|i| i.kind.as_str()).collect();
    let data: Vec<&Value> = batch.iter().map(|i| &i.data).collect();
    let times: Vec<i64> = batch.iter().map(|i| i.at_us).collect();
    let conn = db.conn().await?;
    conn.execute(
        "INSERT INTO interactions (id, user_id, interaction_type, data, created_at) \
         SELECT t.id, t.user_id, t.kind, t.data, \
                'epoch'::timestamptz + t.at_us * interval '1 microsecond' \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[], $5::bigint[]) \
              AS t(id, user_id, kind, data, at_us) \
         WHERE EXISTS (SELECT 1 FROM cascade_users u WHERE u.id = t.user_id) \
         ON CONFLICT (id) DO NOTHING",
        &[&ids, &users, &kinds, &data, &times],
    )
    .await?;
    Ok(())
}

/// The retention task: every `every`, deletes rows older than `retention`.
pub async fn run_retention(db: Db, retention: Duration, every: Duration, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.recv() => return,
            _ = tick.tick() => {}
        }
        match delete_expired(&db, retention, &stop).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "interaction log: rows past retention deleted"),
            Err(err) => {
                tracing::warn!(error = %err, "interaction log: retention sweep failed; next sweep retries")
            }
        }
    }
}

/// Deletes rows older than `retention`, [`RETENTION_BATCH`] per statement, until none is
/// left or shutdown comes. Instances sweeping at once skip each other's rows.
async fn delete_expired(
    db: &Db,
    retention: Duration,
    stop: &ShutdownSignal,
) -> Result<u64, DbError> {
    let age_us = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    let mut deleted = 0;
    loop {
        let conn = db.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM interactions WHERE id IN ( \
                     SELECT id FROM interactions \
                     WHERE created_at < now() - $1::bigint * interval '1 microsecond' \
                     ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&age_us, &RETENTION_BATCH],
            )
            .await?;
        deleted += n;
        if n < RETENTION_BATCH as u64 || stop.is_triggered() {
            return Ok(deleted);
        }
    }
}

/// `GET /me/interactions` parameters as received.
#[derive(Deserialize, Default)]
pub struct MineParams {
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// The default and largest page of `GET /me/interactions`.
pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

/// `GET /me/interactions`.
#[utoipa::path(get, path = "/me/interactions", tag = "citizens", security(("bearer" = [])),
    params(
        ("limit" = Option<i64>, Query, description = "Items per page, 1 to 100 (default 20)", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page: `<microseconds>.<id>`", pattern = "^[0-9]{1,16}\\.[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
    ),
    responses(
        (status = 200, description = "The caller's interactions, newest first (an interaction appears once its batch is written, within about INTERACTIONS_FLUSH_INTERVAL)", body = crate::openapi::InteractionPage),
        (status = 400, description = "A limit out of range or a cursor this route did not hand out"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn mine(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Query(params): Query<MineParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(params.limit.as_deref())?;
    let cursor = params.cursor.as_deref().map(parse_cursor).transpose()?;
    let (cursor_us, cursor_id) = cursor.unzip();
    let conn = state.app.db.conn().await?;
    let rows = conn
        .query(
            "SELECT id, interaction_type, data, \
                    (extract(epoch FROM created_at) * 1000000)::bigint, \
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM interactions \
             WHERE user_id = $1 \
               AND ($2::bigint IS NULL OR (created_at, id) < \
                    ('epoch'::timestamptz + $2 * interval '1 microsecond', $3::uuid)) \
             ORDER BY created_at DESC, id DESC LIMIT $4",
            &[&me.user_id, &cursor_us, &cursor_id, &(limit + 1)],
        )
        .await
        .map_err(DbError::from)?;
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let items: Vec<Value> = page
        .iter()
        .map(|row| {
            json!({
                "id": row.get::<_, Uuid>(0),
                "type": row.get::<_, &str>(1),
                "data": row.get::<_, Value>(2),
                "created_at": row.get::<_, &str>(4),
            })
        })
        .collect();
    let next_cursor = page
        .last()
        .filter(|_| more)
        .map(|row| format!("{}.{}", row.get::<_, i64>(3), row.get::<_, Uuid>(0)));
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })))
}

fn parse_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    raw.parse::<i64>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| {
            ApiError::bad_request(
                "limit",
                format!("limit: expected a whole number from 1 to {MAX_LIMIT}"),
            )
        })
}

/// `<µs>.<uuid>` as `GET /me/interactions` hands it out, as the OpenAPI document's pattern
/// says: at most 16 digits of microseconds since the epoch (up to the year 2286; no sign, so
/// every value is a time PostgreSQL can add to the epoch), a dot, a hyphenated UUID.
fn parse_cursor(raw: &str) -> Result<(i64, Uuid), ApiError> {
    let refused = || {
        ApiError::bad_request(
            "cursor",
            "cursor: not a cursor returned by GET /me/interactions",
        )
    };
    let (us, id) = raw.split_once('.').ok_or_else(refused)?;
    if !(1..=16).contains(&us.len()) || !us.bytes().all(|b| b.is_ascii_digit()) || id.len() != 36 {
        return Err(refused());
    }
    let us = us.parse::<i64>().map_err(|_| refused())?;
    let id = Uuid::try_parse(id).map_err(|_| refused())?;
    Ok((us, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(buffer: usize, batch: usize) -> InteractionsConfig {
        InteractionsConfig {
            buffer,
            batch,
            flush_interval: Duration::from_secs(1),
            retention: None,
            sweep_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_full_buffer_drops_instead_of_growing() {
        let log = Interactions::new(&config(3, 2));
        for user in 0..10 {
            log.record(user, InteractionKind::CitizenLink, json!({}));
        }
        assert_eq!(log.buffered(), 3);
        let first = log.take();
        assert_eq!(
            first.iter().map(|i| i.user_id).collect::<Vec<_>>(),
            vec![0, 1],
            "oldest first, one batch at most"
        );
        assert_ne!(first[0].id, first[1].id);
        assert_eq!(log.take().len(), 1);
        assert!(log.take().is_empty());
    }

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let id = Uuid::new_v4();
        assert_eq!(
            parse_cursor(&format!("1764770000123456.{id}")).unwrap(),
            (1_764_770_000_123_456, id)
        );
        for bad in [
            "",
            "123",
            "abc.def",
            &format!(".{id}"),
            &format!("12a.{id}"),
            &format!("99999999999999999.{id}"),
            &format!("-1.{id}"),
            &format!("+1.{id}"),
            &format!("1.{}", id.simple()),
            &"9".repeat(100),
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
        for bad in ["0", "101", "-1", "ten", ""] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(parse_limit(None).unwrap(), DEFAULT_LIMIT);
    }
}
