//! The durable invalidation log (`cache_invalidation_log`, core migration 7): invalidations
//! this instance could not deliver to Redis or announce on the bus, kept in PostgreSQL so
//! that the other instances learn of them even if this one never comes back.
//!
//! The hole it closes. An instance that lost Redis alone (a partition cutting only its
//! connections) remembers what it could not deliver and replays it when Redis answers again
//! (`invalidate.rs`). Until then the others, which still read Redis and still hear each other
//! on the bus, keep serving the old entry from Redis and from their in-process tiers; and if
//! the instance dies first, they serve it until its TTL.
//!
//! Writing. A round (`batcher.rs`) or a `set` whose delivery to Redis failed, or whose bus
//! announcement could not be made, is written here in one statement with a `pg_notify` on
//! [`CHANNEL`], right after the caller's transaction committed and before the caller returns:
//! an acknowledged write is in the log, whatever becomes of its instance afterwards. (A crash
//! between the commit and the invalidation is not covered, connected or not: nothing has run
//! yet that could record it.) The writer keeps the row's id with what it remembered, and its
//! own replay marks the row delivered.
//!
//! Consulting. Every instance with the Redis tier runs a watcher (`log_reader.rs`): it reads
//! the undelivered rows of its key prefix (one statement on a partial index) on each
//! notification (a `LISTEN` on a dedicated connection, the bus's PostgreSQL listener), after
//! any doubt (its own return to
//! Redis after an outage, a new bus subscription, a peer that stopped being heard), when the
//! `LISTEN` connection is opened again, and every `invalidation_log_poll` as a fallback. Rows
//! it has not seen yet are dropped from its in-process tier (marked first, so a load in flight
//! cannot install what it read). Then, if its breaker is closed, all the rows are delivered as
//! one invalidation (the same script), announced on the bus, dropped again, and marked
//! delivered; otherwise they are remembered, so this instance replays them before it reads
//! Redis again, and that replay marks them. Delivering twice is harmless.
//!
//! The bound. After a write acknowledged by an instance cut off from Redis, another instance
//! that reaches PostgreSQL serves the old value for at most the time its `LISTEN` takes to hear
//! the notification (milliseconds), or, if that connection was down, until it is opened again
//! or the next poll, whichever is first: at most `invalidation_log_poll` (5 s) plus one query
//! and one Redis round trip. Once an instance delivered the row, every other instance has
//! processed its announcement or stopped trusting its tier within the bus's window (300 ms).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::tier::SharedTier;
use super::{Cache, Inner};
use crate::config::CacheConfig;
use crate::db::{Db, DbError};

/// The notification channel, one for every deployment: the payload is the key prefix.
pub(super) const CHANNEL: &str = "cascade_cache_invalidation_log";
/// Most rows one consultation reads; a full batch is followed by another at once.
pub(super) const BATCH: i64 = 1000;
/// Bound of each statement on the log, on top of the pool's own deadlines.
const DEADLINE: Duration = Duration::from_secs(5);
/// Undelivered rows are pruned this long after the longest TTL: no entry stored before them
/// can still be cached anywhere.
const AGE_MARGIN: Duration = Duration::from_secs(60);

/// One instance's side of the log.
pub(crate) struct InvalidationLog {
    pub(super) db: Db,
    /// `CACHE_KEY_PREFIX`: the rows of this deployment, and the notifications' payload.
    pub(super) prefix: String,
    /// This instance's bus id: who wrote or delivered a row.
    instance: String,
    pub(super) poll: Duration,
    /// Undelivered rows whose invalidation this instance already applied to its in-process
    /// tier (a set, not a high-water mark: ids are taken in one order and committed in
    /// another, so a lower id can appear after a higher one).
    pub(super) seen: Mutex<HashSet<i64>>,
    /// Raised on a doubt; a permit is kept when the watcher is busy, so none is lost.
    pub(super) doubt: Arc<Notify>,
    /// Rows older than this cannot name anything still cached.
    max_age: Duration,
}

/// One undelivered row.
pub(super) struct Entry {
    pub id: i64,
    pub keys: Vec<String>,
    pub tags: Vec<String>,
}

impl InvalidationLog {
    fn new(db: Db, config: &CacheConfig, instance: String, poll: Duration) -> Self {
        let longest = config
            .ttls
            .values()
            .copied()
            .fold(config.default_ttl, Duration::max);
        InvalidationLog {
            db,
            prefix: config.key_prefix.clone(),
            instance,
            poll,
            seen: Mutex::default(),
            doubt: Arc::new(Notify::new()),
            max_age: longest + AGE_MARGIN,
        }
    }

    pub(super) fn seen(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something may have been missed: look at the log soon.
    pub fn doubt(&self) {
        self.doubt.notify_one();
    }

    /// Writes an undelivered invalidation and notifies every listening instance: one statement.
    async fn write(&self, keys: &[String], tags: &[String]) -> Result<i64, DbError> {
        let run = async {
            let conn = self.db.conn().await?;
            let statement = conn
                .prepare_cached(
                    "WITH logged AS (
                       INSERT INTO cache_invalidation_log (key_prefix, keys, tags, written_by)
                       VALUES ($1, $2, $3, $4) RETURNING id
                     )
                     SELECT id, pg_notify($5, $1) FROM logged",
                )
                .await?;
            let row = conn
                .query_one(
                    &statement,
                    &[&self.prefix, &keys, &tags, &self.instance, &CHANNEL],
                )
                .await?;
            Ok(row.get::<_, i64>(0))
        };
        within(run).await
    }

    /// The oldest undelivered rows of this deployment but `except`, at most [`BATCH`].
    pub(super) async fn undelivered(&self, except: &[i64]) -> Result<Vec<Entry>, DbError> {
        let run = async {
            let conn = self.db.conn().await?;
            let statement = conn
                .prepare_cached(
                    "SELECT id, keys, tags FROM cache_invalidation_log
                     WHERE key_prefix = $1 AND delivered_at IS NULL AND NOT (id = ANY($2))
                     ORDER BY id LIMIT $3",
                )
                .await?;
            let rows = conn
                .query(&statement, &[&self.prefix, &except, &BATCH])
                .await?;
            Ok(rows
                .iter()
                .map(|row| Entry {
                    id: row.get(0),
                    keys: row.get(1),
                    tags: row.get(2),
                })
                .collect())
        };
        within(run).await
    }

    /// Marks `ids` delivered by this instance; rows another instance marked first are left
    /// as they are (and not counted again).
    pub(super) async fn mark_delivered(&self, ids: &[i64]) -> Result<(), DbError> {
        if ids.is_empty() {
            return Ok(());
        }
        let run = async {
            let conn = self.db.conn().await?;
            let statement = conn
                .prepare_cached(
                    "UPDATE cache_invalidation_log SET delivered_at = now(), delivered_by = $2
                     WHERE id = ANY($1) AND delivered_at IS NULL RETURNING written_by",
                )
                .await?;
            let rows = conn.query(&statement, &[&ids, &self.instance]).await?;
            for row in rows {
                let by = if row.get::<_, &str>(0) == self.instance {
                    "self"
                } else {
                    "peer"
                };
                metrics::counter!(crate::metrics::CACHE_LOG_DELIVERED, "by" => by).increment(1);
            }
            Ok(())
        };
        within(run).await
    }

    /// Removes delivered rows after an hour, and undelivered ones once nothing they name can
    /// still be cached.
    pub(super) async fn prune(&self) -> Result<u64, DbError> {
        let run = async {
            let conn = self.db.conn().await?;
            let statement = conn
                .prepare_cached(
                    "DELETE FROM cache_invalidation_log WHERE key_prefix = $1
                       AND (delivered_at < now() - interval '1 hour'
                            OR (delivered_at IS NULL
                                AND written_at < now() - make_interval(secs => $2)))",
                )
                .await?;
            let age = self.max_age.as_secs_f64();
            Ok(conn.execute(&statement, &[&self.prefix, &age]).await?)
        };
        within(run).await
    }
}

/// `run` within [`DEADLINE`].
async fn within<T>(run: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
    tokio::time::timeout(DEADLINE, run)
        .await
        .unwrap_or_else(|_| {
            Err(DbError::Unavailable(format!(
                "the invalidation log did not answer within {DEADLINE:?}"
            )))
        })
}

impl Inner {
    /// Something may have been missed (Redis answers again after an outage, a new bus
    /// subscription): the log is read soon.
    pub(crate) fn doubt(&self) {
        if let Some(log) = self.log.get() {
            log.doubt();
        }
    }
}

impl Cache {
    /// Keeps invalidations this instance cannot deliver to Redis in PostgreSQL (`db`, with
    /// the core migrations applied), and applies those other instances kept there (`log.rs`).
    /// Only with the Redis tier: the PostgreSQL tier is the database itself, and an
    /// in-process cache alone has no peers. Later calls do nothing.
    pub fn log_invalidations(&self, db: Db) {
        let Some(SharedTier::Redis(_)) = &self.inner.shared else {
            return;
        };
        let Some(bus) = &self.inner.bus else {
            return;
        };
        let log = InvalidationLog::new(
            db,
            &self.inner.config,
            bus.id.clone(),
            self.inner.options.invalidation_log_poll,
        );
        if self.inner.log.set(log).is_err() {
            return;
        }
        let task = tokio::spawn(super::log_reader::run(Arc::downgrade(&self.inner)));
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Writes a round that was not delivered or not announced to the log, before its callers
    /// return. `remembered`: its keys and tags are in `Pending`, so the replay that delivers
    /// them marks the row delivered too.
    pub(super) async fn log_undelivered(&self, keys: &[String], tags: &[String], remembered: bool) {
        let Some(log) = self.inner.log.get() else {
            return;
        };
        match log.write(keys, tags).await {
            Ok(id) => {
                metrics::counter!(crate::metrics::CACHE_LOG_WRITTEN).increment(1);
                // Applied here already: this instance's watcher need not drop them again.
                log.seen().insert(id);
                if remembered {
                    self.remember(|p| {
                        p.logged.insert(id);
                    });
                }
            }
            Err(err) => {
                metrics::counter!(crate::metrics::CACHE_LOG_WRITE_ERRORS).increment(1);
                tracing::warn!(error = %err, "an undelivered invalidation could not be logged: other instances may serve the old value until its TTL");
            }
        }
    }

    /// Marks rows delivered beside the caller (a replay may run on a reader's path).
    pub(super) fn mark_logged_delivered(&self, ids: Vec<i64>) {
        if ids.is_empty() || self.inner.log.get().is_none() {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            if let Some(log) = cache.inner.log.get()
                && let Err(err) = log.mark_delivered(&ids).await
            {
                tracing::debug!(error = %err, "delivered invalidations not marked yet");
            }
        });
    }
}
