//! The idle sweep: a session without a heartbeat for `CONSCIOUSNESS_SESSION_IDLE` is ended
//! (`end_reason: "idle"`), and its user leaves the spaces they joined through it.
//!
//! Every instance runs the sweep; each idle session is ended by exactly one of them: the
//! sweep's `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) AND is_active RETURNING`
//! (`session_queries::end_idle`) skips rows another sweep holds and re-checks that the row is
//! still active once locked, so what one instance returns no other does. The instance that
//! ended a session removes the cache entries its leaving made stale.

use std::time::Duration;

use cascade_core::shutdown::ShutdownSignal;
use cascade_http::AppState;

use super::session_queries::{self as queries, Ended};
use super::sessions::left_spaces;
use super::{SpaceError, events};

/// Sessions ended per transaction: a backlog is worked off in short transactions.
const BATCH: i64 = 500;
/// Batches per sweep at most; the rest waits for the next sweep.
const MAX_BATCHES: usize = 20;
/// Bound of one batch's statements (the invalidations that follow have their own).
const BATCH_DEADLINE: Duration = Duration::from_secs(30);

/// How often to sweep: a quarter of the idle time, so a session ends at most 25 % after it
/// went idle; between 100 ms and 30 s.
pub fn interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// The background task: sweeps every [`interval`] until `stop`.
pub async fn run(app: AppState, idle: Duration, mut stop: ShutdownSignal) {
    let every = interval(idle);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.recv() => return,
        }
        match sweep(&app, idle).await {
            Ok(0) => {}
            Ok(ended) => tracing::info!(ended, "ended idle consciousness sessions"),
            Err(err) => tracing::warn!(error = %err, "idle session sweep failed; next one retries"),
        }
    }
}

/// One sweep: idle sessions ended by this instance, batch by batch.
pub async fn sweep(app: &AppState, idle: Duration) -> Result<usize, SpaceError> {
    let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let ended = tokio::time::timeout(BATCH_DEADLINE, batch(app, idle_ms))
            .await
            .map_err(|_| SpaceError::Internal("an idle sweep batch timed out".into()))??;
        app.cache.invalidate_batch(&left_spaces(&ended)).await;
        events::publish(&app.events, events::sessions_ended(&ended, "idle")).await;
        total += ended.len();
        if (ended.len() as i64) < BATCH {
            break;
        }
    }
    Ok(total)
}

async fn batch(app: &AppState, idle_ms: i64) -> Result<Vec<Ended>, SpaceError> {
    let mut conn = app.db.conn().await?;
    let tx = conn.transaction().await?;
    let ended = queries::end_idle(&*tx, idle_ms, BATCH).await?;
    tx.commit().await?;
    Ok(ended)
}
