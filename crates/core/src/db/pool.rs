//! The one PostgreSQL pool every module shares.
//!
//! deadpool leaves its wait/create/recycle timeouts unset by default, so an exhausted or
//! unreachable pool would make callers wait forever (PITFALLS 1). Every one of them is set
//! here, connections are verified when recycled (a restarted server leaves dead sockets in
//! the pool; [`Recycler`] says when the check is skipped), and request connections carry a
//! server-side `statement_timeout` so one stuck query cannot hold a slot hostage.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool::managed::{Metrics, RecycleError, RecycleResult, TimeoutType, Timeouts};
use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, PoolError, RecyclingMethod, Runtime,
};
use serde::Serialize;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::DbError;
use super::conn::{Conn, Pooler};
use super::replica::ReplicaSet;
use super::tls::{PgTls, SslMode};
use crate::config::{DatabaseConfig, DatabaseSource};
use crate::retry::{Attempt, Backoff, retry};

type Pool = deadpool::managed::Pool<Recycler>;

/// How recently a connection must have been handed out for its next hand-out to skip the check.
const CHECKED_RECENTLY: Duration = Duration::from_secs(1);

/// Recycles as `RecyclingMethod::Verified` does (an empty query proves the server still answers
/// on this socket), except for a connection handed out less than [`CHECKED_RECENTLY`] ago: under
/// load that is every one, and the extra round trip was a sixth of a cache miss's CPU. A socket
/// the server closed (a restart or a crash: the server ends its connections) is still refused
/// at once, by `is_closed`: the connection's task saw it end. A server that vanished without
/// closing (a network partition) is noticed by the query itself, bounded by `REQUEST_TIMEOUT`.
/// A connection [`doom`](Recycler::doom)ed (a statement abandoned on it) is refused and closed.
pub struct Recycler(Manager, Mutex<HashSet<usize>>);

impl Recycler {
    /// Refuses `client` when it is next recycled: it may still run a statement whose answer
    /// nobody reads, so it must never serve another caller.
    fn doom(&self, key: usize) {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
    }

    fn doomed(&self, client: &ClientWrapper) -> bool {
        self.1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&client_key(client))
    }
}

/// A connection's identity that survives moves in and out of the pool: its statement cache.
fn client_key(client: &ClientWrapper) -> usize {
    Arc::as_ptr(&client.statement_cache) as usize
}

impl deadpool::managed::Manager for Recycler {
    type Type = ClientWrapper;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<ClientWrapper, tokio_postgres::Error> {
        self.0.create().await
    }

    async fn recycle(
        &self,
        client: &mut ClientWrapper,
        metrics: &Metrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        if self.doomed(client) {
            return Err(RecycleError::message("a statement was abandoned on it"));
        }
        if !client.is_closed() && metrics.last_used() < CHECKED_RECENTLY {
            return Ok(());
        }
        self.0.recycle(client, metrics).await
    }

    fn detach(&self, client: &mut ClientWrapper) {
        self.doomed(client);
        self.0.detach(client);
    }
}

/// A cheap-to-clone handle on the shared pool.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Where the pool connects, `host:port`, for error messages and health output.
    address: String,
    min_size: usize,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    stats: AcquireStats,
    /// The connection settings without `statement_timeout`, for probes.
    base_config: tokio_postgres::Config,
    /// The TLS every connection to this server uses (`sslmode` of the URL).
    tls: MakeRustlsConnect,
    /// Where connections of their own go (migrations, `LISTEN`) and their TLS: PostgreSQL
    /// itself (`DATABASE_DIRECT_URL`) when given, else as the pool.
    maintenance: (tokio_postgres::Config, MakeRustlsConnect),
    /// Whether `maintenance` is `DATABASE_DIRECT_URL`.
    has_direct: bool,
    /// `PgBouncer` when the pool goes through a transaction-mode pooler (resolved, never `Auto`).
    pooler: Pooler,
    /// Read replicas of this server, attached once after connecting (none by default).
    replicas: OnceLock<ReplicaSet>,
}

/// Running totals of pool acquisitions, kept with atomics so reading them never blocks.
#[derive(Default)]
struct AcquireStats {
    count: AtomicU64,
    total_micros: AtomicU64,
    max_micros: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
}

/// Why [`Db::conn_within`] gave no connection.
pub(super) enum Acquire {
    /// None was free within the wait: the pool is busy, the server may be fine.
    Busy,
    /// The server could not be reached (connect failed or timed out, or the pool is closed).
    Failed(DbError),
}

/// A snapshot of the pool, as `/health/db` and the metrics endpoint show it.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub max_size: usize,
    pub min_size: usize,
    pub size: usize,
    pub idle: usize,
    pub in_use: usize,
    pub waiting: usize,
    pub acquired_total: u64,
    pub acquire_timeouts: u64,
    pub acquire_errors: u64,
    pub acquire_mean_micros: u64,
    pub acquire_max_micros: u64,
}

/// One table's size, as the metrics endpoint and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub struct TableStats {
    /// `schema.table` outside `public`, the bare name inside it.
    pub table: String,
    /// `pg_stat_user_tables.n_live_tup`: an estimate, kept by autovacuum and ANALYZE.
    pub rows: i64,
    /// `pg_total_relation_size`: heap, indexes and TOAST.
    pub size_bytes: i64,
}

/// The statistics collector's row estimate (counting would scan every table) and the size of
/// each table with its indexes and TOAST.
const TABLE_STATS_SQL: &str = "\
    SELECT CASE WHEN schemaname = 'public' THEN relname ELSE schemaname || '.' || relname END, \
           n_live_tup, pg_total_relation_size(relid) \
    FROM pg_stat_user_tables ORDER BY 3 DESC, 1";

/// PostgreSQL's status under a deadline.
#[derive(Debug, Clone, Serialize)]
pub struct DbHealth {
    pub up: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pool: PoolStats,
    /// `pgbouncer` when the pool goes through PgBouncer (`PG_POOLER`), else `none`.
    pub pooler: &'static str,
}

impl Db {
    /// Opens the pool: connects once with bounded retries (exponential backoff with jitter,
    /// at most `startup_timeout` in all), then pre-opens `pool_min` connections.
    pub async fn connect(
        settings: &DatabaseConfig,
        pg: tokio_postgres::Config,
        address: String,
    ) -> Result<Db, DbError> {
        let (mut base_config, tls_settings, tls) = prepare(settings, pg)?;
        match wait_until_reachable(&base_config, &tls, &address, settings).await {
            // libpq's prefer: a TLS handshake that fails (a server offering only old TLS
            // versions, a key rustls refuses) is retried in plain text, as before TLS support.
            Err(DbError::Unreachable { last, .. })
                if tls_settings.mode == SslMode::Prefer
                    && last.contains("error performing TLS handshake") =>
            {
                tracing::warn!(address, error = %last, "the TLS handshake failed and sslmode is prefer: connecting without TLS (set sslmode=verify-full to require it)");
                base_config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                wait_until_reachable(&base_config, &tls, &address, settings).await?;
            }
            other => other?,
        }
        let pooler = match settings.pooler {
            Pooler::Auto => detect_pooler(&base_config, &tls, settings.connect_timeout).await,
            chosen => chosen,
        };
        if pooler == Pooler::PgBouncer {
            tracing::info!(
                address,
                "PostgreSQL is reached through PgBouncer: unnamed statements, no session state"
            );
        }
        let db = Db::open(settings, base_config, tls, address, pooler)?;
        db.top_up().await;
        Ok(db)
    }

    /// A pool that connects on first use only: a server that is down now does not hold
    /// anything up (a read replica: its health loop says when it answers).
    pub fn connect_lazy(
        settings: &DatabaseConfig,
        pg: tokio_postgres::Config,
        address: String,
    ) -> Result<Db, DbError> {
        let (base_config, _, tls) = prepare(settings, pg)?;
        // Nothing to probe yet: `auto` is a direct connection here (set PG_POOLER=pgbouncer
        // when the replicas too are behind PgBouncer).
        let pooler = match settings.pooler {
            Pooler::Auto => Pooler::None,
            chosen => chosen,
        };
        Db::open(settings, base_config, tls, address, pooler)
    }

    fn open(
        settings: &DatabaseConfig,
        base_config: tokio_postgres::Config,
        tls: MakeRustlsConnect,
        address: String,
        pooler: Pooler,
    ) -> Result<Db, DbError> {
        let mut request_config = base_config.clone();
        // PgBouncer refuses the `options` startup parameter (unless told to ignore it, and then
        // it is lost): behind it `statement_timeout` is the role's or database's setting.
        if pooler != Pooler::PgBouncer {
            with_statement_timeout(&mut request_config, settings.statement_timeout);
        }
        let maintenance = match &settings.direct {
            Some(direct @ DatabaseSource::External { config, .. }) => {
                let direct_settings = DatabaseConfig {
                    source: direct.clone(),
                    ..settings.clone()
                };
                let (config, _, connector) = prepare(&direct_settings, (**config).clone())?;
                (config, connector)
            }
            _ => (base_config.clone(), tls.clone()),
        };
        let manager = Manager::from_config(
            request_config,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(Recycler(manager, Mutex::default()))
            .max_size(settings.pool_max)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.acquire_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Db {
            inner: Arc::new(Inner {
                pool,
                address,
                min_size: settings.pool_min,
                acquire_timeout: settings.acquire_timeout,
                connect_timeout: settings.connect_timeout,
                stats: AcquireStats::default(),
                base_config,
                tls,
                maintenance,
                has_direct: settings.direct.is_some(),
                pooler,
                replicas: OnceLock::new(),
            }),
        })
    }

    /// Routes lag-tolerant reads ([`read`](Self::read)) to these replicas from now on. Once
    /// per pool: a second set is refused.
    pub fn attach_replicas(&self, replicas: ReplicaSet) -> Result<(), DbError> {
        self.inner
            .replicas
            .set(replicas)
            .map_err(|_| DbError::Config("replicas are already attached".into()))
    }

    /// The read replicas, when `DATABASE_REPLICA_URLS` names some.
    pub fn replicas(&self) -> Option<&ReplicaSet> {
        self.inner.replicas.get()
    }

    /// Runs `query` for a read that tolerates replication lag (a cache load, a search) on a
    /// read replica that has replayed every write acknowledged before this call, or on the
    /// primary when none has (or none is configured, or one does not answer within
    /// `DATABASE_REPLICA_TIMEOUT` or fails there: the read is then run again on the primary).
    /// `DATABASE_REPLICA_TIMEOUT` bounds the whole read on a replica: a read slower than
    /// that is cancelled there, its connection closed, and run again on the primary.
    /// `query` may so run twice, and must only read. The rule and its reasons: [`ReplicaSet`].
    pub async fn read<T, E, F, Fut>(&self, mut query: F) -> Result<T, E>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<DbError>,
    {
        if let Some(replicas) = self.replicas()
            && let Some((replica, conn)) = replicas.route(self).await
        {
            let cancel = conn.cancel_token();
            let key = client_key(&conn);
            let on = replica.db();
            let mut read = Box::pin(query(conn));
            match tokio::time::timeout(replicas.timeout(), &mut read).await {
                Ok(Ok(answer)) => {
                    replica.served();
                    return Ok(answer);
                }
                // The replica may have died under the read (its connection closed): a read
                // may run twice, so the primary answers rather than the error.
                Ok(Err(_)) => replicas.failed(),
                Err(_) => {
                    // The statement may still run there: cancel it, and never hand out its
                    // connection again (doomed before the read lets go of it).
                    on.inner.pool.manager().doom(key);
                    drop(read);
                    let tls = on.inner.tls.clone();
                    let bound = on.inner.connect_timeout;
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(bound, cancel.cancel_query(tls)).await;
                    });
                    replicas.abandoned(&replica);
                }
            }
        }
        query(self.conn().await?).await
    }

    /// Opens connections until the pool holds at least `PG_POOL_MIN` of them. Called at
    /// start and by the maintenance task, so a restarted server gets its warm pool back.
    pub async fn top_up(&self) {
        let missing = self
            .inner
            .min_size
            .saturating_sub(self.inner.pool.status().size);
        let mut held = Vec::with_capacity(missing);
        for _ in 0..missing {
            match self.inner.pool.get().await {
                Ok(conn) => held.push(conn),
                Err(err) => {
                    tracing::debug!(error = %err, "could not pre-open a pool connection");
                    break;
                }
            }
        }
    }

    /// A connection from the pool, or an error after `PG_ACQUIRE_TIMEOUT`.
    pub async fn conn(&self) -> Result<Conn, DbError> {
        let started = Instant::now();
        let result = self.inner.pool.get().await;
        let stats = &self.inner.stats;
        let micros = started.elapsed().as_micros() as u64;
        match result {
            Ok(object) => {
                let conn = Conn::new(object, self.inner.pooler);
                stats.count.fetch_add(1, Ordering::Relaxed);
                stats.total_micros.fetch_add(micros, Ordering::Relaxed);
                stats.max_micros.fetch_max(micros, Ordering::Relaxed);
                crate::metrics::record_pool_acquire(started.elapsed());
                Ok(conn)
            }
            Err(PoolError::Timeout(_)) => {
                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(DbError::Unavailable(format!(
                    "no PostgreSQL connection within {:?} ({})",
                    self.inner.acquire_timeout, self.inner.address
                )))
            }
            Err(err) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(DbError::Unavailable(format!(
                    "PostgreSQL at {}: {err}",
                    self.inner.address
                )))
            }
        }
    }

    /// A connection if one is free or can be opened, waiting at most `wait` for a busy
    /// pool to free one: [`Acquire::Busy`] says none came (the server may be fine), and
    /// [`Acquire::Failed`] that the server could not be reached. Counted in this pool's
    /// stats only (not the primary's acquire histogram): for replica routing.
    pub(super) async fn conn_within(&self, wait: Duration) -> Result<Conn, Acquire> {
        let started = Instant::now();
        let timeouts = Timeouts {
            wait: Some(wait),
            create: Some(self.inner.connect_timeout),
            recycle: Some(self.inner.connect_timeout),
        };
        let result = self.inner.pool.timeout_get(&timeouts).await;
        let stats = &self.inner.stats;
        match result {
            Ok(object) => {
                let conn = Conn::new(object, self.inner.pooler);
                let micros = started.elapsed().as_micros() as u64;
                stats.count.fetch_add(1, Ordering::Relaxed);
                stats.total_micros.fetch_add(micros, Ordering::Relaxed);
                stats.max_micros.fetch_max(micros, Ordering::Relaxed);
                Ok(conn)
            }
            Err(PoolError::Timeout(TimeoutType::Wait)) => {
                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(Acquire::Busy)
            }
            Err(err) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(Acquire::Failed(DbError::Unavailable(format!(
                    "PostgreSQL at {}: {err}",
                    self.inner.address
                ))))
            }
        }
    }

    /// Closes `conn` instead of returning it to the pool (a statement was abandoned on it).
    pub(super) fn discard(conn: Conn) {
        drop(deadpool::managed::Object::take(conn.into_object()));
    }

    /// One connection of its own, outside the pool (for probes that must not wait behind
    /// busy pool connections), with the pool's `statement_timeout`. The caller bounds it.
    pub(super) async fn single(&self) -> Result<tokio_postgres::Client, DbError> {
        let mut config = self.inner.base_config.clone();
        if self.inner.pooler != Pooler::PgBouncer {
            with_statement_timeout(&mut config, self.inner.connect_timeout);
        }
        let (client, connection) = config.connect(self.inner.tls.clone()).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// `SELECT 1` through the pool, bounded by `deadline`.
    pub async fn health(&self, deadline: Duration) -> DbHealth {
        let started = Instant::now();
        let probe = async {
            let conn = self.conn().await?;
            conn.simple_query("SELECT 1").await?;
            Ok::<_, DbError>(())
        };
        let error = match tokio::time::timeout(deadline, probe).await {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(_) => Some(format!("no answer within {deadline:?}")),
        };
        DbHealth {
            up: error.is_none(),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            error,
            pool: self.stats(),
            pooler: self.inner.pooler.name(),
        }
    }

    pub fn stats(&self) -> PoolStats {
        let status = self.inner.pool.status();
        let s = &self.inner.stats;
        let count = s.count.load(Ordering::Relaxed);
        PoolStats {
            max_size: status.max_size,
            min_size: self.inner.min_size,
            size: status.size,
            idle: status.available,
            in_use: status.size.saturating_sub(status.available),
            waiting: status.waiting,
            acquired_total: count,
            acquire_timeouts: s.timeouts.load(Ordering::Relaxed),
            acquire_errors: s.errors.load(Ordering::Relaxed),
            acquire_mean_micros: s
                .total_micros
                .load(Ordering::Relaxed)
                .checked_div(count)
                .unwrap_or(0),
            acquire_max_micros: s.max_micros.load(Ordering::Relaxed),
        }
    }

    /// Row estimates and on-disk sizes of the tables in the current database's user schemas,
    /// largest first, under `deadline`.
    pub async fn table_stats(&self, deadline: Duration) -> Result<Vec<TableStats>, DbError> {
        let query = async {
            let conn = self.conn().await?;
            let rows = conn.query(TABLE_STATS_SQL, &[]).await?;
            Ok::<_, DbError>(
                rows.iter()
                    .map(|row| TableStats {
                        table: row.get(0),
                        rows: row.get(1),
                        size_bytes: row.get(2),
                    })
                    .collect(),
            )
        };
        tokio::time::timeout(deadline, query)
            .await
            .unwrap_or_else(|_| {
                Err(DbError::Unavailable(format!(
                    "table statistics: no answer within {deadline:?}"
                )))
            })
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// Connection settings without the request `statement_timeout`: for migrations and
    /// other maintenance that may legitimately run long, and for `LISTEN`. PostgreSQL itself
    /// (`DATABASE_DIRECT_URL`) when given: behind PgBouncer in transaction mode a `LISTEN`
    /// would hear nothing once its transaction ended.
    pub fn maintenance_config(&self) -> &tokio_postgres::Config {
        &self.inner.maintenance.0
    }

    /// The TLS connector of [`maintenance_config`](Self::maintenance_config)'s connections
    /// (a `LISTEN` connection, migrations): `db.maintenance_config().connect(db.tls())`.
    pub fn tls(&self) -> MakeRustlsConnect {
        self.inner.maintenance.1.clone()
    }

    /// What the pool connects through: `PgBouncer` (unnamed statements, no session state) or
    /// `None` (PostgreSQL itself).
    pub fn pooler(&self) -> Pooler {
        self.inner.pooler
    }

    /// Whether connections of their own ([`maintenance_config`](Self::maintenance_config))
    /// reach PostgreSQL itself, so `LISTEN` hears notifications: not behind PgBouncer without
    /// `DATABASE_DIRECT_URL`.
    pub fn can_listen(&self) -> bool {
        self.inner.pooler != Pooler::PgBouncer || self.inner.has_direct
    }

    /// Closes every connection; callers waiting on the pool get an error.
    pub fn close(&self) {
        self.inner.pool.close();
        if let Some(replicas) = self.replicas() {
            replicas.close();
        }
    }
}

/// The connection settings every pool connection starts from (deadlines, keepalives, the
/// URL's TLS), the URL's TLS settings, and the TLS connector.
fn prepare(
    settings: &DatabaseConfig,
    pg: tokio_postgres::Config,
) -> Result<(tokio_postgres::Config, PgTls, MakeRustlsConnect), DbError> {
    let mut base_config = pg;
    base_config.connect_timeout(settings.connect_timeout);
    base_config.keepalives(true);
    base_config.keepalives_idle(Duration::from_secs(30));
    if base_config.get_application_name().is_none() {
        base_config.application_name("cascade");
    }

    // TLS as the URL's sslmode asks; a private server (embedded, on a socket) needs none.
    let tls_settings = match &settings.source {
        DatabaseSource::External { tls, .. } => tls.clone(),
        DatabaseSource::Embedded { .. } => PgTls {
            mode: SslMode::Disable,
            roots: None,
        },
    };
    // libpq ignores sslmode on Unix sockets: PostgreSQL never offers TLS there.
    let sockets_only = base_config
        .get_hosts()
        .iter()
        .all(|host| matches!(host, tokio_postgres::config::Host::Unix(_)));
    base_config.ssl_mode(if sockets_only {
        tokio_postgres::config::SslMode::Disable
    } else {
        tls_settings.tokio_mode()
    });
    let tls = tls_settings.connector().map_err(DbError::Config)?;
    Ok((base_config, tls_settings, tls))
}

/// Adds `-c statement_timeout=…` to the startup `options`.
fn with_statement_timeout(config: &mut tokio_postgres::Config, timeout: Duration) {
    let options = format!(
        "{} -c statement_timeout={}",
        config.get_options().unwrap_or(""),
        timeout.as_millis()
    );
    config.options(options.trim());
}

/// `PG_POOLER=auto`: whether `config`'s server is PgBouncer. PgBouncer serves a virtual
/// database `pgbouncer` (its admin console) on every listener and answers `SHOW VERSION`
/// there with its name; PostgreSQL has no such database (3D000), or one whose `SHOW VERSION`
/// fails. A PgBouncer that refuses this user its console (a user in neither `admin_users` nor
/// `stats_users`) says so with its own error, `FATAL: not allowed`, which PostgreSQL never
/// sends. One connection, at
/// start, bounded by `timeout`; no answer means a direct connection.
async fn detect_pooler(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    timeout: Duration,
) -> Pooler {
    let mut probe = config.clone();
    probe.dbname("pgbouncer");
    let answer = tokio::time::timeout(timeout, async {
        let (client, connection) = probe.connect(tls.clone()).await?;
        let driver = tokio::spawn(connection);
        let version = client.simple_query("SHOW VERSION").await;
        drop(client);
        let _ = driver.await;
        version
    })
    .await;
    match answer {
        Ok(Ok(messages)) => {
            let pgbouncer = messages.iter().any(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    row.get(0).is_some_and(|v| v.contains("PgBouncer"))
                }
                _ => false,
            });
            if pgbouncer {
                Pooler::PgBouncer
            } else {
                Pooler::None
            }
        }
        Ok(Err(err)) => {
            let refused_by_pgbouncer = err
                .as_db_error()
                .is_some_and(|db| db.message() == "not allowed");
            if refused_by_pgbouncer {
                Pooler::PgBouncer
            } else {
                Pooler::None
            }
        }
        Err(_) => Pooler::None,
    }
}

/// Connects once to prove the server is there, retrying within the startup bound.
async fn wait_until_reachable(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    address: &str,
    settings: &DatabaseConfig,
) -> Result<(), DbError> {
    let outcome = retry(Backoff::within(settings.startup_timeout), |attempt| async move {
        let result = tokio::time::timeout(settings.connect_timeout, async {
            let (client, connection) = config.connect(tls.clone()).await?;
            let driver = tokio::spawn(connection);
            let answer = client.simple_query("SELECT 1").await;
            drop(client);
            let _ = driver.await;
            answer.map(|_| ())
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                let fatal = is_fatal(&err);
                let message = error_chain(&err);
                if !fatal {
                    tracing::warn!(attempt, address, error = %message, "PostgreSQL not reachable yet");
                }
                Err(if fatal { Attempt::Fatal(message) } else { Attempt::Retry(message) })
            }
            Err(_) => Err(Attempt::Retry(format!("no answer within {:?}", settings.connect_timeout))),
        }
    })
    .await;
    outcome.map_err(|gave_up| DbError::Unreachable {
        address: address.to_string(),
        attempts: gave_up.attempts,
        elapsed: gave_up.elapsed,
        last: gave_up.last,
    })
}

/// Errors that waiting will not fix: the server answered and said no.
fn is_fatal(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    // A refused certificate, or a server without TLS when the URL requires it: retrying
    // changes nothing, and the message says which.
    if tls_refused(err) {
        return true;
    }
    // 3D000: the database named in the URL does not exist.
    let no_database = SqlState::from_code("3D000");
    err.code().is_some_and(|code| {
        [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            no_database,
        ]
        .contains(code)
    })
}

/// Whether the TLS handshake failed (rustls refused the server) or the server offers no TLS
/// where the URL requires it.
fn tls_refused(err: &tokio_postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        // tokio-rustls hands rustls's error inside an io::Error, whose `source` skips it.
        let in_io = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<rustls::Error>());
        if in_io
            || cause.is::<rustls::Error>()
            || cause.to_string().contains("server does not support TLS")
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The error and its sources on one line ("error connecting to server: Connection refused").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
