//! The background sync: every `CONSCIOUSNESS_SYNC_INTERVAL`, the patterns that expire within
//! the horizon are read from Venice again, so reads keep finding fresh rows.
//!
//! One instance at a time, cluster-wide: each run holds a transaction-level advisory lock,
//! taken with `pg_try_advisory_xact_lock` (an instance that finds it taken skips this round
//! instead of queueing behind it), and the candidates are chosen *after* taking it, so a run
//! that follows another's sees the rows that one refreshed and leaves them alone. A
//! transaction lock ends with its transaction, also when the task is stopped mid-run (the
//! dropped transaction rolls back): no connection goes back to the pool still holding it.
//!
//! While Venice's breaker is open the run is skipped (and stops between patterns when it
//! opens): the sync must not be the thing that keeps probing a failing Venice. Each refresh
//! invalidates the cached pattern through the engine (every instance), and publishes
//! `pattern.changed` when the content changed (`refresh`).

use std::time::Duration;

use cascade_core::cache::BreakerState;
use cascade_core::db::DbError;
use cascade_core::shutdown::ShutdownSignal;

use super::{PatternType, refresh, store};
use crate::AppModuleState;
use crate::config::PATTERNS;

/// The advisory lock key of the sync (`"cpattern"` in ASCII).
const LOCK: i64 = 0x6370_6174_7465_726e;

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Skipped: another instance holds the lock, or Venice's breaker is open.
    pub skipped: Option<&'static str>,
    pub refreshed: usize,
    pub changed: usize,
    pub failed: usize,
}

/// How far ahead a run looks: two intervals (so a pattern is refreshed at least one interval
/// before it expires), at most half the TTL (so a pattern is not refreshed every run).
pub fn horizon(interval: Duration, ttl: Duration) -> Duration {
    (interval * 2).min(ttl / 2)
}

/// Runs the sync every `CONSCIOUSNESS_SYNC_INTERVAL` until `stop`.
pub async fn run(state: AppModuleState, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval(state.config.consciousness.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: nothing is about to expire at startup that a read would
    // not load anyway.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        match once(&state).await {
            Ok(report) if report.refreshed + report.failed > 0 => {
                tracing::info!(?report, "patterns sync")
            }
            Ok(report) => tracing::debug!(?report, "patterns sync"),
            Err(err) => tracing::warn!(error = %err, "patterns sync failed; next run retries"),
        }
    }
}

/// One run (see the module doc).
pub async fn once(state: &AppModuleState) -> Result<Report, DbError> {
    let consciousness = &state.config.consciousness;
    if state.venice.breaker_state() == BreakerState::Open {
        return Ok(skipped("venice breaker open"));
    }
    let mut conn = state.app.db.conn().await?;
    let tx = conn.transaction().await.map_err(DbError::from)?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LOCK])
        .await?
        .try_get(0)?;
    if !locked {
        return Ok(skipped("another instance is syncing"));
    }
    let horizon = horizon(consciousness.sync_interval, consciousness.cache_ttl);
    let due = store::expiring(&*tx, horizon).await?;
    let mut report = Report::default();
    for kind in due.iter().filter_map(|name| PatternType::from_name(name)) {
        if state.venice.breaker_state() == BreakerState::Open {
            report.skipped = Some("venice breaker opened");
            break;
        }
        match refresh(state, kind).await {
            Ok(stored) => {
                state.app.cache.invalidate(PATTERNS, kind.name()).await;
                report.refreshed += 1;
                report.changed += usize::from(stored.changed);
            }
            Err(err) => {
                report.failed += 1;
                tracing::warn!(pattern = kind.name(), error = %err, "pattern not refreshed");
            }
        }
    }
    tx.commit().await?;
    Ok(report)
}

fn skipped(why: &'static str) -> Report {
    Report {
        skipped: Some(why),
        ..Report::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_is_two_intervals_within_half_the_ttl() {
        let s = Duration::from_secs;
        assert_eq!(horizon(s(30), s(300)), s(60));
        assert_eq!(horizon(s(30), s(40)), s(20));
    }
}
