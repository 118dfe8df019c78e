//! `GET /metrics` in the Prometheus text format, and the middleware that counts requests.
//!
//! Events (a request, a pool acquisition, an upstream call) are recorded where they happen,
//! through the `metrics` facade. State that already has an owner (pool status, the cache
//! engine's cumulative counters, the breaker, Redis memory, table sizes) is copied into gauges
//! and counters when a scrape arrives, so there is one source for each number and nothing to
//! keep in sync between scrapes. The names and help texts live in `cascade_core::metrics`.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cascade_core::cache::{BreakerState, Cache};
use cascade_core::db::{DbHealth, ReplicaHealth, TableStats};
use cascade_core::metrics as m;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use cascade_http::AppState;

use crate::state::ServerState;

/// How long the scrape-time probes of PostgreSQL and the table statistics may take.
const PROBE_DEADLINE: Duration = Duration::from_secs(1);
/// Table statistics are read at most this often: `pg_total_relation_size` touches every
/// table's files, and a scrape every second should not.
const TABLE_STATS_EVERY: Duration = Duration::from_secs(10);

/// The handle on the process's Prometheus recorder, plus the scrape-time bookkeeping.
///
/// The `metrics` facade's recorder is process-wide by design (that is what lets `core` record
/// without holding a handle), so it is installed once per process; every `Metrics` shares it.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    handle: PrometheusHandle,
    /// When table statistics were last read; `None` before the first scrape.
    tables_read: Mutex<Option<Instant>>,
}

impl Metrics {
    /// Installs the Prometheus recorder (once per process) with our histogram buckets.
    pub fn install() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .set_buckets(m::LATENCY_BUCKETS)
                    .expect("the bucket list is not empty")
                    .build_recorder();
                let handle = recorder.handle();
                if let Err(err) = metrics::set_global_recorder(recorder) {
                    tracing::warn!(error = %err, "another metrics recorder is installed: /metrics will be empty");
                }
                m::describe();
                m::register_zeroes();
                handle
            })
            .clone();
        Metrics {
            inner: Arc::new(Inner {
                handle,
                tables_read: Mutex::new(None),
            }),
        }
    }

    /// The exposition text of every metric.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    /// Drains recorded histogram samples into their buckets every `every`, so memory stays
    /// bounded when nobody scrapes.
    pub async fn run_upkeep(
        self,
        every: Duration,
        mut stop: cascade_core::shutdown::ShutdownSignal,
    ) {
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tokio::time::sleep(every) => self.inner.handle.run_upkeep(),
            }
        }
    }

    /// True at most once per [`TABLE_STATS_EVERY`].
    fn tables_due(&self) -> bool {
        let mut last = self
            .inner
            .tables_read
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= TABLE_STATS_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

pub fn router() -> Router<ServerState> {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/metrics/live", get(crate::http::live::live))
}

#[tracing::instrument(skip_all)]
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String))
)]
async fn scrape(State(state): State<ServerState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        refreshed(&state).await,
    )
        .into_response()
}

/// Copies the state that has an owner into the metrics (see the module's doc), then renders
/// every metric: what a scrape answers, and what the dashboard's samples are taken from.
pub(crate) async fn refreshed(state: &ServerState) -> String {
    let tables = async {
        if state.metrics.tables_due() {
            Some(state.app.db.table_stats(PROBE_DEADLINE).await)
        } else {
            None
        }
    };
    let (pg, tables, ()) = tokio::join!(
        state.app.db.health(PROBE_DEADLINE),
        tables,
        refresh_redis(&state.app)
    );
    refresh_postgres(&pg);
    if let Some(replicas) = state.app.db.replicas() {
        refresh_replicas(&replicas.health());
    }
    match tables {
        Some(Ok(tables)) => refresh_tables(&tables),
        Some(Err(err)) => tracing::debug!(error = %err, "table statistics unavailable"),
        None => {}
    }
    refresh_cache(&state.app.cache);
    state.metrics.render()
}

fn refresh_postgres(pg: &DbHealth) {
    gauge!(m::PG_UP).set(if pg.up { 1.0 } else { 0.0 });
    gauge!(m::PG_LATENCY).set(pg.latency_ms / 1000.0);
    let pool = &pg.pool;
    gauge!(m::PG_POOL_MAX_SIZE).set(pool.max_size as f64);
    gauge!(m::PG_POOL_MIN_SIZE).set(pool.min_size as f64);
    gauge!(m::PG_POOL_SIZE).set(pool.size as f64);
    gauge!(m::PG_POOL_IDLE).set(pool.idle as f64);
    gauge!(m::PG_POOL_IN_USE).set(pool.in_use as f64);
    gauge!(m::PG_POOL_WAITING).set(pool.waiting as f64);
    counter!(m::PG_POOL_ACQUIRE_TIMEOUTS).absolute(pool.acquire_timeouts);
    counter!(m::PG_POOL_ACQUIRE_ERRORS).absolute(pool.acquire_errors);
}

/// The health loop's view of each replica (it probes on its own schedule; a scrape reads it).
fn refresh_replicas(replicas: &[ReplicaHealth]) {
    for replica in replicas {
        let label = [("replica", replica.address.clone())];
        let flag = |on: bool| if on { 1.0 } else { 0.0 };
        gauge!(m::PG_REPLICA_IN_ROTATION, &label).set(flag(replica.in_rotation));
        gauge!(m::PG_REPLICA_UP, &label).set(flag(replica.up));
        gauge!(m::PG_REPLICA_LAG_BYTES, &label).set(replica.lag_bytes as f64);
        gauge!(m::PG_REPLICA_LAG_SECONDS, &label).set(replica.lag_seconds);
    }
}

fn refresh_tables(tables: &[TableStats]) {
    for table in tables {
        let label = [("table", table.table.clone())];
        gauge!(m::PG_TABLE_ROWS, &label).set(table.rows as f64);
        gauge!(m::PG_TABLE_SIZE, &label).set(table.size_bytes as f64);
    }
}

/// Copies the cache engine's cumulative counters (it keeps them for `/health/db` too).
fn refresh_cache(cache: &Cache) {
    for ns in cache.stats() {
        let namespace = [("namespace", ns.namespace.clone())];
        for (tier, hits) in [("near", ns.near_hits), ("shared", ns.shared_hits)] {
            let labels = [
                ("namespace", ns.namespace.clone()),
                ("tier", tier.to_string()),
            ];
            counter!(m::CACHE_HITS, &labels).absolute(hits);
        }
        for (name, value) in [
            (m::CACHE_MISSES, ns.misses),
            (m::CACHE_LOADS, ns.loads),
            (m::CACHE_LEASE_WAITS, ns.lease_waits),
            (m::CACHE_INVALIDATIONS, ns.invalidations),
            (m::CACHE_NEGATIVE_HITS, ns.negative_hits),
            (m::CACHE_STALE_SETS_REFUSED, ns.stale_sets_refused),
            (m::CACHE_SHARED_ERRORS, ns.shared_errors),
            (m::CACHE_EARLY_REFRESHES, ns.early_refreshes),
            (m::CACHE_SPECULATIVE_FILLS, ns.speculative_fills),
            (m::CACHE_SPECULATIVE_UNFILLED, ns.speculative_unfilled),
            (m::CACHE_SPECULATIVE_FOUND, ns.speculative_found),
        ] {
            counter!(name, &namespace).absolute(value);
        }
        let mean_load = (ns.load_micros_total as f64 / 1e6) / ns.loads.max(1) as f64;
        gauge!(m::CACHE_LOAD_MEAN, &namespace).set(mean_load);
        gauge!(m::CACHE_HIT_RATIO, &namespace).set(ns.hit_ratio());
    }
    let state = match cache.breaker_state() {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    };
    gauge!(m::BREAKER_STATE, "breaker" => "cache_shared_tier").set(state);
    if let Some(usage) = cache.memory_usage() {
        gauge!(m::CACHE_MEMORY_ENTRIES).set(usage.entries as f64);
        gauge!(m::CACHE_MEMORY_WEIGHTED).set(usage.weighted_bytes as f64);
        gauge!(m::CACHE_MEMORY_CAPACITY).set(usage.capacity_bytes as f64);
    }
}

/// PING and `INFO memory`, each under `REDIS_TIMEOUT`; nothing when Redis is not configured.
/// Values that cannot be read are NaN rather than the last value seen.
async fn refresh_redis(state: &AppState) {
    let Some(redis) = &state.redis else {
        return;
    };
    let (health, memory) = tokio::join!(redis.health(), redis.memory());
    gauge!(m::REDIS_UP).set(if health.up { 1.0 } else { 0.0 });
    gauge!(m::REDIS_LATENCY).set(if health.up {
        health.latency_ms / 1000.0
    } else {
        f64::NAN
    });
    let memory = memory.ok();
    let value = |f: fn(&cascade_core::redis::RedisMemory) -> Option<f64>| {
        memory.as_ref().and_then(f).unwrap_or(f64::NAN)
    };
    gauge!(m::REDIS_USED_MEMORY).set(value(|mem| Some(mem.used_memory as f64)));
    gauge!(m::REDIS_MAXMEMORY).set(value(|mem| Some(mem.maxmemory as f64)));
    gauge!(m::REDIS_MEMORY_LIMIT).set(value(|mem| mem.limit().map(|l| l as f64)));
    gauge!(m::REDIS_MEMORY_RATIO).set(value(|mem| mem.used_ratio()));
}
