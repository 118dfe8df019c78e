//! Read replicas: which reads may go to one, which replica is fresh enough, and the health
//! loop that takes a lagging or silent replica out of rotation.
//!
//! # The rule: a read fence, taken after the read began
//!
//! A read that tolerates lag ([`Db::read`]: the catalog's cache loads of assets and listings,
//! search) first learns the primary's WAL position, `pg_current_wal_lsn()`, from a query sent
//! *after* the read began: the *fence*. It then goes to a replica only if that replica's
//! `pg_last_wal_replay_lsn()` is at or past the fence, and to the primary otherwise.
//!
//! Every write acknowledged before the read began has its commit record at or before the
//! fence (with `synchronous_commit` on or `local`, the default, a commit is acknowledged after
//! its WAL is flushed, and flushed ≤ written = `pg_current_wal_lsn`; with `off` the walwriter
//! writes it within `wal_writer_delay`, so set `synchronous_commit` to on or local where
//! replicas are used). So a replica past the fence shows every such write, whoever made it:
//! - **read-your-writes**, for the writing session, every session of this instance, and every
//!   other instance too (stronger than keeping the highest LSN each instance wrote, which
//!   only covers its own writes, and needs no hook in any write path);
//! - **the cache never fills from a replica behind the invalidation it serves**: a write
//!   invalidates after it commits, so an invalidation applied or heard before a load began
//!   belongs to a write at or before the load's fence, which the replica has replayed. An
//!   invalidation that arrives while the load runs is the cache engine's business, as with
//!   the primary (its lease refuses the fill).
//!
//! Replay positions only grow, so a replay position read at any time before the read (by the
//! health loop, by an earlier read) is a sound lower bound: when it already passes the fence
//! no extra query is needed; otherwise the replica is asked once, on the read's connection.
//!
//! The fence costs one tiny statement on the primary, shared by every read that arrived
//! before it was sent ([`Fence`]): a burst of cache misses pays one round trip, and the heavy
//! statements run on the replicas.
//!
//! # Rotation
//!
//! The health loop asks the primary for its WAL position and every replica for its replay
//! position each [`probe_interval`], each under `DATABASE_REPLICA_TIMEOUT`, on a connection
//! of its own outside the pools (a busy pool does not make a replica look dead; the fence
//! shares the primary's). A replica leaves rotation when it does not answer, is no longer
//! in recovery (promoted), or is further behind than `DATABASE_REPLICA_MAX_LAG`; it comes
//! back when a probe finds it within the bound.
//!
//! A replica whose pool has no free connection within [`BUSY_WAIT`] is skipped for that read
//! (`pool_busy`), not taken out: only a statement on a held connection that gets no answer
//! (for half a timeout or more, or a probe's whole one) marks a replica down. Choosing a
//! replica (the fence and every replica tried) is bounded by one `DATABASE_REPLICA_TIMEOUT`
//! in all, and the read on the chosen replica by another: a read that runs longer there is
//! cancelled, its connection closed, the replica taken out of rotation, and the read run
//! again on the primary. A replica showing another cluster's `system_identifier` than the
//! primary's never joins rotation. So a paused (SIGSTOP) or partitioned
//! replica costs a read at most two timeouts before it runs on the primary, and only until
//! the first such read or probe; and `DATABASE_REPLICA_TIMEOUT` must exceed the slowest
//! read routed to replicas.
//!
//! Each replica URL must name one server: its replay position is remembered per URL, so a
//! load balancer or reader endpoint in front of several would let one server's position
//! vouch for another's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::counter;
use serde::Serialize;
use tokio_postgres::types::PgLsn;

use super::DbError;
use super::conn::Conn;
use super::pool::{Acquire, Db, PoolStats};
use crate::config::{DatabaseConfig, DatabaseSource, ReplicaConfig};
use crate::shutdown::ShutdownSignal;

/// How often the health loop probes: a quarter of the lag bound, between 50 ms and 1 s, so a
/// replica past the bound leaves rotation within about a quarter of the bound plus a timeout.
pub fn probe_interval(max_lag: Duration) -> Duration {
    (max_lag / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// How long a read waits for a free connection of a replica's pool before trying the next
/// replica (or the primary): a busy replica is not a dead one.
pub const BUSY_WAIT: Duration = Duration::from_millis(50);

/// The read replicas of one primary: a cheap-to-clone handle.
#[derive(Clone)]
pub struct ReplicaSet {
    inner: Arc<SetInner>,
}

struct SetInner {
    replicas: Vec<Arc<Replica>>,
    max_lag: Duration,
    timeout: Duration,
    fence: Fence,
    /// The primary connection the fence and the health loop ask for the WAL position.
    primary_probe: Single,
    /// The primary's `system_identifier` (0 until the health loop has read it): a replica
    /// showing another is a copy of another cluster and never joins rotation.
    primary_id: AtomicU64,
    /// Where the next read starts looking, so reads spread over the replicas.
    next: AtomicUsize,
    /// `(when, primary WAL position)` of the health loop's recent probes, oldest first: what
    /// turns a replay position into a lag in time ([`SetInner::lag_since`]).
    history: Mutex<VecDeque<(Instant, u64)>>,
}

/// One replica: its pool and what the last probes and reads learnt of it.
pub struct Replica {
    db: Db,
    /// The health loop's connection, outside the pool.
    probe: Single,
    /// The URL, password redacted.
    display: String,
    in_rotation: AtomicBool,
    /// The highest replay position seen (by a probe or a read); replay positions only grow.
    replay_lsn: AtomicU64,
    /// Bytes of WAL the primary had written that this replica had not replayed, at the last
    /// probe.
    lag_bytes: AtomicU64,
    /// How old the primary state the replica shows was at the last probe, in microseconds.
    lag_micros: AtomicU64,
    /// Whether the last probe or read that asked it got an answer.
    up: AtomicBool,
    error: Mutex<Option<String>>,
    reads: AtomicU64,
}

/// Why a read that could have gone to a replica went to the primary.
#[derive(Debug, Clone, Copy)]
enum Fallback {
    /// No replica is in rotation.
    NoneInRotation,
    /// The primary's position could not be read in time: no replica can be proven fresh.
    NoFence,
    /// Every replica in rotation is behind the fence.
    Behind,
    /// No replica's pool had a free connection within [`BUSY_WAIT`].
    PoolBusy,
    /// The replica did not answer within the timeout (the read was run again).
    Timeout,
    /// The read failed on the replica (it was run again).
    Error,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Fallback::NoneInRotation => "none_in_rotation",
            Fallback::NoFence => "no_fence",
            Fallback::Behind => "behind",
            Fallback::PoolBusy => "pool_busy",
            Fallback::Timeout => "timeout",
            Fallback::Error => "error",
        }
    }
}

fn fell_back(reason: Fallback) {
    counter!(crate::metrics::PG_REPLICA_FALLBACKS, "reason" => reason.label()).increment(1);
}

/// One replica as `/health/db` and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaHealth {
    /// The URL, password redacted.
    pub url: String,
    pub address: String,
    /// The last probe or read that asked it got an answer.
    pub up: bool,
    pub in_rotation: bool,
    /// `pg_last_wal_replay_lsn()` as PostgreSQL prints it (`0/3000148`).
    pub replay_lsn: String,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// Reads this replica answered.
    pub reads: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pool: PoolStats,
}

impl ReplicaSet {
    /// One lazy pool per replica (nothing connects before the health loop's first probe):
    /// the primary's pool settings, with waits bounded by `DATABASE_REPLICA_TIMEOUT`. Every
    /// replica starts out of rotation until a probe finds it within the lag bound.
    pub fn new(config: &ReplicaConfig, primary: &DatabaseConfig) -> Result<ReplicaSet, DbError> {
        let mut replicas = Vec::with_capacity(config.sources.len());
        for source in &config.sources {
            let DatabaseSource::External {
                config: pg,
                display,
                address,
                ..
            } = source
            else {
                return Err(DbError::Config(
                    "a replica must be given by URL (DATABASE_REPLICA_URLS)".into(),
                ));
            };
            let settings = DatabaseConfig {
                source: source.clone(),
                pool_min: 0,
                acquire_timeout: config.timeout,
                connect_timeout: primary.connect_timeout.min(config.timeout),
                direct: None,
                ..primary.clone()
            };
            let mut pg = (**pg).clone();
            if pg.get_application_name().is_none() {
                pg.application_name("cascade-replica-reads");
            }
            replicas.push(Arc::new(Replica {
                db: Db::connect_lazy(&settings, pg, address.clone())?,
                probe: Single::default(),
                display: display.clone(),
                in_rotation: AtomicBool::new(false),
                replay_lsn: AtomicU64::new(0),
                lag_bytes: AtomicU64::new(0),
                lag_micros: AtomicU64::new(0),
                up: AtomicBool::new(false),
                error: Mutex::new(Some("not probed yet".into())),
                reads: AtomicU64::new(0),
            }));
        }
        Ok(ReplicaSet {
            inner: Arc::new(SetInner {
                replicas,
                max_lag: config.max_lag,
                timeout: config.timeout,
                fence: Fence::default(),
                primary_probe: Single::default(),
                primary_id: AtomicU64::new(0),
                next: AtomicUsize::new(0),
                history: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// `DATABASE_REPLICA_TIMEOUT`.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// `DATABASE_REPLICA_MAX_LAG`.
    pub fn max_lag(&self) -> Duration {
        self.inner.max_lag
    }

    /// A replica in rotation that has replayed past a fence taken now, with a connection to
    /// it; `None` sends the read to the primary (the reason is counted).
    pub(super) async fn route(&self, primary: &Db) -> Option<(Arc<Replica>, Conn)> {
        let inner = &self.inner;
        let count = inner.replicas.len();
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let candidates: Vec<&Arc<Replica>> = (0..count)
            .map(|i| &inner.replicas[(start + i) % count])
            .filter(|r| r.in_rotation.load(Ordering::Acquire))
            .collect();
        if candidates.is_empty() {
            fell_back(Fallback::NoneInRotation);
            return None;
        }
        // Choosing a replica, fence included, takes one timeout at most in all.
        let deadline = tokio::time::Instant::now() + inner.timeout;
        let Ok(fence) = inner
            .fence
            .take(primary, &inner.primary_probe, inner.timeout)
            .await
        else {
            fell_back(Fallback::NoFence);
            return None;
        };
        // Why the read goes to the primary, if it does: the last replica's reason.
        let mut reason = Fallback::Behind;
        for replica in candidates {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                reason = Fallback::Timeout;
                break;
            }
            let acquired =
                tokio::time::timeout_at(deadline, replica.db.conn_within(left.min(BUSY_WAIT)))
                    .await;
            let Ok(acquired) = acquired else {
                // Out of time while connecting: the health loop judges this replica.
                reason = Fallback::Timeout;
                break;
            };
            let conn = match acquired {
                Ok(conn) => conn,
                Err(Acquire::Busy) => {
                    reason = Fallback::PoolBusy;
                    continue;
                }
                Err(Acquire::Failed(err)) => {
                    reason = Fallback::Error;
                    replica.up.store(false, Ordering::Relaxed);
                    replica.leave(&err.to_string());
                    continue;
                }
            };
            if replica.replay_lsn.load(Ordering::Acquire) < fence {
                let asked = tokio::time::timeout_at(
                    deadline,
                    conn.query_one("SELECT pg_last_wal_replay_lsn()", &[]),
                )
                .await;
                match asked {
                    Ok(Ok(row)) => {
                        let replay = row.get::<_, Option<PgLsn>>(0).map_or(0, u64::from);
                        replica.replay_lsn.fetch_max(replay, Ordering::AcqRel);
                    }
                    Ok(Err(err)) => {
                        reason = Fallback::Error;
                        replica.leave(&DbError::from(err).to_string());
                        continue;
                    }
                    Err(_) => {
                        // Its statement may still be pending: the connection goes too. No
                        // answer in at least half a timeout (the first replica tried gets
                        // nearly a whole one) marks the replica down; less, the health loop
                        // judges it.
                        Db::discard(conn);
                        reason = Fallback::Timeout;
                        if left >= inner.timeout / 2 {
                            replica.silent(inner.timeout);
                        }
                        continue;
                    }
                }
            }
            if replica.replay_lsn.load(Ordering::Acquire) >= fence {
                return Some((replica.clone(), conn));
            }
            reason = Fallback::Behind;
        }
        fell_back(reason);
        None
    }

    /// A read on `replica` got no answer in time: out of rotation until a probe answers.
    pub(super) fn abandoned(&self, replica: &Replica) {
        fell_back(Fallback::Timeout);
        replica.silent(self.inner.timeout);
    }

    /// A read failed on a replica: counted, and run again on the primary. Rotation is the
    /// health loop's call (a dead replica also fails its next connection, in `route`).
    pub(super) fn failed(&self) {
        fell_back(Fallback::Error);
    }

    /// Probes the primary and every replica each [`probe_interval`] until `stop`.
    pub async fn run_health(self, primary: Db, mut stop: ShutdownSignal) {
        let every = probe_interval(self.inner.max_lag);
        loop {
            self.probe(&primary).await;
            tokio::select! {
                _ = stop.recv() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One round of the health loop: the primary's position first, then each replica's
    /// replay position (all replicas at once, each bounded), and the rotation they decide.
    pub async fn probe(&self, primary: &Db) {
        let inner = &self.inner;
        match primary_lsn(primary, &inner.primary_probe, inner.timeout).await {
            Ok(lsn) => inner.remember(Instant::now(), lsn),
            // Without the primary's position no lag can be measured; reads go to the
            // primary's fence anyway, which fails the same way, so rotation stays as is.
            Err(err) => {
                tracing::debug!(error = %err, "replica health: the primary's WAL position is unknown")
            }
        }
        if inner.primary_id.load(Ordering::Acquire) == 0 {
            match inner
                .primary_probe
                .query_one(primary, SYSTEM_ID, inner.timeout)
                .await
            {
                Ok(row) => inner
                    .primary_id
                    .store(row.get::<_, i64>(0) as u64, Ordering::Release),
                Err(err) => {
                    tracing::debug!(error = ?err, "replica health: the primary's system_identifier is unknown")
                }
            }
        }
        let primary_id = inner.primary_id.load(Ordering::Acquire);
        let probes = inner.replicas.iter().map(|replica| async move {
            let answer = replica
                .probe
                .query_one(
                    &replica.db,
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), \
                     (SELECT system_identifier FROM pg_control_system())",
                    inner.timeout,
                )
                .await
                .map(|row| {
                    (
                        row.get::<_, bool>(0),
                        row.get::<_, Option<PgLsn>>(1).map_or(0, u64::from),
                        row.get::<_, i64>(2) as u64,
                    )
                });
            match answer {
                Ok((_, _, id)) if primary_id != 0 && id != primary_id => {
                    replica.up.store(true, Ordering::Relaxed);
                    let why = format!(
                        "a copy of another cluster: system_identifier {id}, the primary's is {primary_id}"
                    );
                    let known = replica.error.lock().unwrap_or_else(|p| p.into_inner()).as_deref()
                        == Some(why.as_str());
                    if !known {
                        tracing::error!(replica = replica.db.address(), reason = why, "read replica refused");
                    }
                    replica.leave(&why);
                }
                Ok((true, replay, _)) => {
                    replica.replay_lsn.fetch_max(replay, Ordering::AcqRel);
                    let replay = replica.replay_lsn.load(Ordering::Acquire);
                    let (bytes, lag) = inner.lag_of(replay, Instant::now());
                    replica.lag_bytes.store(bytes, Ordering::Relaxed);
                    replica
                        .lag_micros
                        .store(lag.as_micros() as u64, Ordering::Relaxed);
                    replica.up.store(true, Ordering::Relaxed);
                    if lag > inner.max_lag {
                        replica.leave(&format!(
                            "{:.1}s behind the primary (DATABASE_REPLICA_MAX_LAG is {:?})",
                            lag.as_secs_f64(),
                            inner.max_lag
                        ));
                    } else {
                        replica.join();
                    }
                }
                Ok((false, _, _)) => {
                    replica.up.store(true, Ordering::Relaxed);
                    replica.leave("not in recovery: promoted, or not a replica")
                }
                Err(ProbeError::Timeout(_)) => replica.silent(inner.timeout),
                Err(ProbeError::Db(err)) => {
                    replica.up.store(false, Ordering::Relaxed);
                    replica.leave(&err.to_string())
                }
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// Every replica's state, for `/health/db` and `/metrics`.
    pub fn health(&self) -> Vec<ReplicaHealth> {
        self.inner
            .replicas
            .iter()
            .map(|r| ReplicaHealth {
                url: r.display.clone(),
                address: r.db.address().to_string(),
                up: r.up.load(Ordering::Relaxed),
                in_rotation: r.in_rotation.load(Ordering::Acquire),
                replay_lsn: PgLsn::from(r.replay_lsn.load(Ordering::Acquire)).to_string(),
                lag_bytes: r.lag_bytes.load(Ordering::Relaxed),
                lag_seconds: r.lag_micros.load(Ordering::Relaxed) as f64 / 1e6,
                reads: r.reads.load(Ordering::Relaxed),
                error: r.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                pool: r.db.stats(),
            })
            .collect()
    }

    /// Closes every replica's pool.
    pub fn close(&self) {
        for replica in &self.inner.replicas {
            replica.db.close();
        }
    }
}

impl SetInner {
    /// Records a primary position; keeps enough history to measure lags a little past the
    /// bound (anything older says "more than the bound" just as well).
    fn remember(&self, at: Instant, lsn: u64) {
        let keep = self.max_lag * 2 + probe_interval(self.max_lag) * 4;
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.push_back((at, lsn));
        while history
            .front()
            .is_some_and(|(first, _)| at.duration_since(*first) > keep)
            && history.len() > 1
        {
            history.pop_front();
        }
    }

    /// The lag of a replica that replayed up to `replay`: in bytes behind the latest primary
    /// position, and in time since the latest probe whose primary position it has replayed
    /// (it shows the primary as of then, or later). Caught up to the latest probe: zero.
    /// Behind every remembered probe: at least as old as the oldest.
    fn lag_of(&self, replay: u64, now: Instant) -> (u64, Duration) {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&(_, latest)) = history.back() else {
            return (0, Duration::ZERO);
        };
        let bytes = latest.saturating_sub(replay);
        let since = match history.iter().rev().find(|(_, lsn)| *lsn <= replay) {
            Some(_) if bytes == 0 => return (0, Duration::ZERO),
            Some(&(at, _)) => at,
            None => history.front().map_or(now, |(at, _)| *at),
        };
        (bytes, now.saturating_duration_since(since))
    }
}

impl Replica {
    /// The replica's pool.
    pub(super) fn db(&self) -> &Db {
        &self.db
    }

    pub(super) fn served(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        counter!(crate::metrics::PG_REPLICA_READS, "replica" => self.db.address().to_string())
            .increment(1);
    }

    /// Out of rotation, saying why (logged once per change).
    fn leave(&self, why: &str) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
        if self.in_rotation.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                replica = self.db.address(),
                reason = why,
                "read replica out of rotation"
            );
        }
    }

    /// A probe or a read got no answer in time: down, and out of rotation.
    fn silent(&self, timeout: Duration) {
        self.up.store(false, Ordering::Relaxed);
        self.leave(&format!("no answer within {timeout:?}"));
    }

    fn join(&self) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if !self.in_rotation.swap(true, Ordering::AcqRel) {
            tracing::info!(replica = self.db.address(), "read replica in rotation");
        }
    }
}

/// Which cluster a server belongs to: a replica shares its primary's.
const SYSTEM_ID: &str = "SELECT system_identifier FROM pg_control_system()";

/// The primary's WAL position now, under `deadline`, on the dedicated connection `on`.
async fn primary_lsn(primary: &Db, on: &Single, deadline: Duration) -> Result<u64, DbError> {
    let row = on
        .query_one(primary, "SELECT pg_current_wal_lsn()", deadline)
        .await
        .map_err(|err| match err {
            ProbeError::Timeout(d) => DbError::Unavailable(format!(
                "the primary's WAL position: no answer within {d:?}"
            )),
            ProbeError::Db(err) => err,
        })?;
    Ok(u64::from(row.get::<_, PgLsn>(0)))
}

/// Why a [`Single`] statement gave no row.
#[derive(Debug)]
enum ProbeError {
    /// No answer within the deadline (connecting included).
    Timeout(Duration),
    Db(DbError),
}

/// One connection outside any pool, for the tiny statements of the fence and the health
/// loop: opened on first use, closed after an error or a missed deadline, opened again on
/// the next use (each use bounded by its deadline, connecting included).
#[derive(Default)]
struct Single {
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Single {
    async fn query_one(
        &self,
        db: &Db,
        sql: &str,
        deadline: Duration,
    ) -> Result<tokio_postgres::Row, ProbeError> {
        let asked = tokio::time::timeout(deadline, async {
            let mut slot = self.client.lock().await;
            let client = match slot.take() {
                Some(client) if !client.is_closed() => client,
                _ => db.single().await.map_err(ProbeError::Db)?,
            };
            // Unnamed (one round trip, and nothing left on a server connection behind
            // PgBouncer).
            let row = client
                .query_typed_one(sql, &[])
                .await
                .map_err(|e| ProbeError::Db(e.into()))?;
            *slot = Some(client);
            Ok(row)
        })
        .await;
        // A missed deadline dropped the client with its unanswered statement: the next use
        // connects afresh.
        asked.unwrap_or(Err(ProbeError::Timeout(deadline)))
    }
}

/// The primary's WAL position, read by a statement sent after the caller arrived, one
/// statement for every caller that arrived before it was sent (as Raft's ReadIndex batches
/// reads behind one leader check).
///
/// Each caller takes a ticket. A leader, holding `leader`, reads how many tickets were taken
/// (`covers`) *before* sending its statement, then publishes `(covers, lsn)`: every ticket up
/// to `covers` arrived before the statement was sent, so that position is a valid fence for
/// it. Callers that arrived during a statement wait for the lock and find themselves covered
/// by the next one.
#[derive(Default)]
struct Fence {
    tickets: AtomicU64,
    /// The highest ticket covered so far and the position that covers it.
    published: Mutex<(u64, u64)>,
    leader: tokio::sync::Mutex<()>,
}

impl Fence {
    async fn take(&self, primary: &Db, on: &Single, deadline: Duration) -> Result<u64, DbError> {
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let fence = async {
            if let Some(lsn) = self.covered(ticket) {
                return Ok(lsn);
            }
            let _turn = self.leader.lock().await;
            if let Some(lsn) = self.covered(ticket) {
                return Ok(lsn);
            }
            let covers = self.tickets.load(Ordering::Acquire);
            let lsn = primary_lsn(primary, on, deadline).await?;
            let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
            *published = (published.0.max(covers), published.1.max(lsn));
            Ok(lsn)
        };
        tokio::time::timeout(deadline, fence)
            .await
            .unwrap_or_else(|_| {
                Err(DbError::Unavailable(format!(
                    "read fence: no answer within {deadline:?}"
                )))
            })
    }

    fn covered(&self, ticket: u64) -> Option<u64> {
        let (covers, lsn) = *self.published.lock().unwrap_or_else(|p| p.into_inner());
        (covers >= ticket).then_some(lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(max_lag: Duration) -> SetInner {
        SetInner {
            replicas: Vec::new(),
            max_lag,
            timeout: Duration::from_secs(1),
            fence: Fence::default(),
            primary_probe: Single::default(),
            primary_id: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            history: Mutex::new(VecDeque::new()),
        }
    }

    #[test]
    fn lag_is_the_age_of_the_newest_primary_position_the_replica_has_replayed() {
        let s = set(Duration::from_secs(1));
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        s.remember(t0, 100);
        s.remember(t0 + ms(250), 200);
        s.remember(t0 + ms(500), 300);
        let now = t0 + ms(600);
        assert_eq!(s.lag_of(300, now), (0, Duration::ZERO));
        assert_eq!(s.lag_of(350, now), (0, Duration::ZERO));
        assert_eq!(s.lag_of(250, now), (50, ms(350)));
        assert_eq!(s.lag_of(50, now), (250, ms(600)));
    }

    #[test]
    fn an_idle_primary_shows_no_lag_however_old_its_last_write() {
        let s = set(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..20 {
            s.remember(t0 + Duration::from_millis(250 * i), 500);
        }
        assert_eq!(
            s.lag_of(500, t0 + Duration::from_secs(6)),
            (0, Duration::ZERO)
        );
    }

    #[test]
    fn history_is_bounded_by_the_lag_it_must_measure() {
        let s = set(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..1000u64 {
            s.remember(t0 + Duration::from_millis(250 * i), i);
        }
        let kept = s.history.lock().unwrap().len();
        assert!(kept <= 20, "{kept} positions kept");
    }
}
