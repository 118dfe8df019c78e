//! The names of Cascade's metrics and the small API that records them.
//!
//! Recording goes through the `metrics` facade: a call is a few atomic operations, and a no-op
//! when no recorder is installed (the CLI's one-shot commands, library tests). The server
//! installs the Prometheus recorder and renders `GET /metrics`; see `cascade-server`'s
//! `http::metrics`. Every name is declared here, once, with its help text in [`describe`], so
//! the exposition always carries `# HELP` and a name cannot drift between writer and reader.
//!
//! Units follow Prometheus conventions: seconds and bytes, `_total` on counters.

use std::time::Duration;

use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Requests served, by `method`, `route` (the route template) and `status`.
pub const HTTP_REQUESTS: &str = "cascade_http_requests_total";
/// Request latency, same labels as [`HTTP_REQUESTS`].
pub const HTTP_REQUEST_DURATION: &str = "cascade_http_request_duration_seconds";

/// Time to get a connection from the PostgreSQL pool (successful acquisitions).
pub const PG_POOL_ACQUIRE_DURATION: &str = "cascade_pg_pool_acquire_duration_seconds";
pub const PG_POOL_MAX_SIZE: &str = "cascade_pg_pool_max_size";
pub const PG_POOL_MIN_SIZE: &str = "cascade_pg_pool_min_size";
pub const PG_POOL_SIZE: &str = "cascade_pg_pool_size";
pub const PG_POOL_IDLE: &str = "cascade_pg_pool_idle";
pub const PG_POOL_IN_USE: &str = "cascade_pg_pool_in_use";
pub const PG_POOL_WAITING: &str = "cascade_pg_pool_waiting";
pub const PG_POOL_ACQUIRE_TIMEOUTS: &str = "cascade_pg_pool_acquire_timeouts_total";
pub const PG_POOL_ACQUIRE_ERRORS: &str = "cascade_pg_pool_acquire_errors_total";
pub const PG_UP: &str = "cascade_pg_up";
pub const PG_LATENCY: &str = "cascade_pg_latency_seconds";
pub const PG_TABLE_ROWS: &str = "cascade_pg_table_rows";
pub const PG_TABLE_SIZE: &str = "cascade_pg_table_size_bytes";
/// Read replicas (`DATABASE_REPLICA_URLS`), by `replica` (its `host:port`).
pub const PG_REPLICA_IN_ROTATION: &str = "cascade_pg_replica_in_rotation";
pub const PG_REPLICA_UP: &str = "cascade_pg_replica_up";
pub const PG_REPLICA_LAG_BYTES: &str = "cascade_pg_replica_lag_bytes";
pub const PG_REPLICA_LAG_SECONDS: &str = "cascade_pg_replica_lag_seconds";
pub const PG_REPLICA_READS: &str = "cascade_pg_replica_reads_total";
/// Reads that could have gone to a replica and went to the primary, by `reason`.
pub const PG_REPLICA_FALLBACKS: &str = "cascade_pg_replica_fallbacks_total";

pub const CACHE_HITS: &str = "cascade_cache_hits_total";
pub const CACHE_MISSES: &str = "cascade_cache_misses_total";
pub const CACHE_LOADS: &str = "cascade_cache_loads_total";
pub const CACHE_LOAD_MEAN: &str = "cascade_cache_load_mean_seconds";
pub const CACHE_LEASE_WAITS: &str = "cascade_cache_lease_waits_total";
pub const CACHE_INVALIDATIONS: &str = "cascade_cache_invalidations_total";
pub const CACHE_NEGATIVE_HITS: &str = "cascade_cache_negative_hits_total";
pub const CACHE_STALE_SETS_REFUSED: &str = "cascade_cache_stale_sets_refused_total";
pub const CACHE_SHARED_ERRORS: &str = "cascade_cache_shared_errors_total";
pub const CACHE_EARLY_REFRESHES: &str = "cascade_cache_early_refreshes_total";
pub const CACHE_SPECULATIVE_FILLS: &str = "cascade_cache_speculative_fills_total";
pub const CACHE_SPECULATIVE_UNFILLED: &str = "cascade_cache_speculative_unfilled_total";
pub const CACHE_SPECULATIVE_FOUND: &str = "cascade_cache_speculative_found_total";
pub const CACHE_HIT_RATIO: &str = "cascade_cache_hit_ratio";
pub const CACHE_MEMORY_ENTRIES: &str = "cascade_cache_memory_entries";
pub const CACHE_MEMORY_WEIGHTED: &str = "cascade_cache_memory_weighted_bytes";
pub const CACHE_MEMORY_CAPACITY: &str = "cascade_cache_memory_capacity_bytes";
pub const BREAKER_STATE: &str = "cascade_breaker_state";

pub const REDIS_UP: &str = "cascade_redis_up";
pub const REDIS_LATENCY: &str = "cascade_redis_latency_seconds";
pub const REDIS_USED_MEMORY: &str = "cascade_redis_used_memory_bytes";
pub const REDIS_MAXMEMORY: &str = "cascade_redis_maxmemory_bytes";
pub const REDIS_MEMORY_LIMIT: &str = "cascade_redis_memory_limit_bytes";
pub const REDIS_MEMORY_RATIO: &str = "cascade_redis_memory_used_ratio";

pub const WS_CONNECTIONS: &str = "cascade_ws_connections";
pub const WS_MESSAGES: &str = "cascade_ws_messages_total";
pub const WS_QUEUE_DEPTH: &str = "cascade_ws_queue_depth";
pub const WS_DROPPED: &str = "cascade_ws_dropped_total";
pub const WS_CLOSES: &str = "cascade_ws_closes_total";
pub const WS_REJECTED: &str = "cascade_ws_rejected_total";
pub const BUS_BLIND_WAITS: &str = "cascade_cache_bus_blind_waits_total";
/// The durable invalidation log (`cache/log.rs`): rows written, rows that could not be
/// written, rows marked delivered, by `by` (`self`: the writer's own replay; `peer`: another
/// instance that read the log).
pub const CACHE_LOG_WRITTEN: &str = "cascade_cache_invalidation_log_written_total";
pub const CACHE_LOG_WRITE_ERRORS: &str = "cascade_cache_invalidation_log_write_errors_total";
pub const CACHE_LOG_DELIVERED: &str = "cascade_cache_invalidation_log_delivered_total";

pub const EVENTS_PUBLISHED: &str = "cascade_events_published_total";
pub const EVENTS_PUBLISH_ERRORS: &str = "cascade_events_publish_errors_total";
pub const EVENTS_RECEIVED: &str = "cascade_events_received_total";
pub const EVENTS_SUBSCRIPTIONS: &str = "cascade_events_subscriptions_total";

pub const UPSTREAM_REQUEST_DURATION: &str = "cascade_upstream_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "cascade_upstream_errors_total";
/// Each upstream's circuit breaker: 0 closed, 1 half-open, 2 open (as [`BREAKER_STATE`]).
pub const UPSTREAM_BREAKER_STATE: &str = "cascade_upstream_breaker_state";
/// Answers served from a stale copy because the upstream failed or its breaker was open.
pub const UPSTREAM_STALE_SERVED: &str = "cascade_upstream_stale_served_total";

/// Interactions (the application's interaction log) not written, by `reason`: `buffer_full`
/// (the in-memory buffer was full when recorded), `refused` (PostgreSQL refused the batch),
/// `shutdown` (still buffered when the flush bound on shutdown ran out).
pub const INTERACTIONS_DROPPED: &str = "cascade_interactions_dropped_total";
/// Interactions written to PostgreSQL.
pub const INTERACTIONS_WRITTEN: &str = "cascade_interactions_written_total";
/// Interactions waiting in memory to be written.
pub const INTERACTIONS_BUFFERED: &str = "cascade_interactions_buffered";

/// Histogram bucket upper bounds, in seconds: from 100 µs (an in-process cache hit, a pool
/// acquisition) to 10 s (`PG_STATEMENT_TIMEOUT`). 0.5 s is a bound so "p95 > 500 ms" (seed 003's
/// alert) is read off a bucket edge, not interpolated across one.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Registers the help text of every metric with the installed recorder. Call once, after
/// installing it.
pub fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests served, by method, route template and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request latency until the response head, by method, route template and status"
    );
    describe_histogram!(
        PG_POOL_ACQUIRE_DURATION,
        Unit::Seconds,
        "time to get a connection from the PostgreSQL pool (successful acquisitions)"
    );
    describe_gauge!(
        PG_POOL_MAX_SIZE,
        "PostgreSQL pool: maximum connections (PG_POOL_MAX)"
    );
    describe_gauge!(
        PG_POOL_MIN_SIZE,
        "PostgreSQL pool: connections kept open (PG_POOL_MIN)"
    );
    describe_gauge!(PG_POOL_SIZE, "PostgreSQL pool: connections open");
    describe_gauge!(PG_POOL_IDLE, "PostgreSQL pool: open connections not in use");
    describe_gauge!(PG_POOL_IN_USE, "PostgreSQL pool: connections handed out");
    describe_gauge!(
        PG_POOL_WAITING,
        "PostgreSQL pool: callers waiting for a connection"
    );
    describe_counter!(
        PG_POOL_ACQUIRE_TIMEOUTS,
        "PostgreSQL pool: acquisitions that gave up after PG_ACQUIRE_TIMEOUT"
    );
    describe_counter!(
        PG_POOL_ACQUIRE_ERRORS,
        "PostgreSQL pool: acquisitions that failed to connect"
    );
    describe_gauge!(
        PG_UP,
        "1 if PostgreSQL answered SELECT 1 within the probe deadline at scrape time"
    );
    describe_gauge!(
        PG_LATENCY,
        Unit::Seconds,
        "PostgreSQL SELECT 1 round trip at scrape time"
    );
    describe_gauge!(
        PG_TABLE_ROWS,
        "estimated live rows per table (pg_stat_user_tables.n_live_tup), refreshed at most every 10 s"
    );
    describe_gauge!(
        PG_TABLE_SIZE,
        Unit::Bytes,
        "table size with indexes and TOAST (pg_total_relation_size), refreshed at most every 10 s"
    );

    describe_gauge!(
        PG_REPLICA_IN_ROTATION,
        "read replica: 1 when lag-tolerant reads may go to it (answering, in recovery, within DATABASE_REPLICA_MAX_LAG)"
    );
    describe_gauge!(
        PG_REPLICA_UP,
        "read replica: 1 when its last health probe answered"
    );
    describe_gauge!(
        PG_REPLICA_LAG_BYTES,
        Unit::Bytes,
        "read replica: WAL the primary had written and the replica had not replayed, at the last probe"
    );
    describe_gauge!(
        PG_REPLICA_LAG_SECONDS,
        Unit::Seconds,
        "read replica: age of the newest primary state it had replayed, at the last probe"
    );
    describe_counter!(
        PG_REPLICA_READS,
        "lag-tolerant reads (cache loads, search) a replica answered"
    );
    describe_counter!(
        PG_REPLICA_FALLBACKS,
        "lag-tolerant reads sent to the primary instead, by reason (none_in_rotation, no_fence, behind, pool_busy, timeout, error)"
    );

    describe_counter!(
        CACHE_HITS,
        "cache lookups answered by a tier, by namespace and tier (near = in-process, shared = Redis or PostgreSQL)"
    );
    describe_counter!(
        CACHE_MISSES,
        "cache lookups that missed every tier, by namespace"
    );
    describe_counter!(
        CACHE_LOADS,
        "loader runs (source-of-truth reads) after a miss, by namespace"
    );
    describe_gauge!(
        CACHE_LOAD_MEAN,
        Unit::Seconds,
        "mean loader run time since start, by namespace"
    );
    describe_counter!(
        CACHE_LEASE_WAITS,
        "lookups that waited for another loader's lease, by namespace"
    );
    describe_counter!(
        CACHE_INVALIDATIONS,
        "invalidations (key, tag or namespace), by namespace"
    );
    describe_counter!(
        CACHE_NEGATIVE_HITS,
        "lookups answered by a cached not-found marker, by namespace"
    );
    describe_counter!(
        CACHE_STALE_SETS_REFUSED,
        "loaded values not stored because an invalidation overtook the load, by namespace"
    );
    describe_counter!(
        CACHE_SHARED_ERRORS,
        "shared-tier calls that failed, by namespace"
    );
    describe_counter!(
        CACHE_EARLY_REFRESHES,
        "probabilistic early refreshes before expiry, by namespace"
    );
    describe_counter!(
        CACHE_SPECULATIVE_FILLS,
        "speculative loads (no lookup first) whose value the shared tier stored, by namespace"
    );
    describe_counter!(
        CACHE_SPECULATIVE_UNFILLED,
        "speculative loads whose store was refused (a recent invalidation, past its deadline, tombstones not complete) or failed, by namespace"
    );
    describe_counter!(
        CACHE_SPECULATIVE_FOUND,
        "speculative loads whose store found a value already in Redis (a load that was not needed), by namespace"
    );
    describe_gauge!(
        CACHE_MEMORY_ENTRIES,
        "in-process cache tier: entries held (absent without the tier)"
    );
    describe_gauge!(
        CACHE_MEMORY_WEIGHTED,
        Unit::Bytes,
        "in-process cache tier: bytes its bound counts (each entry's key and body, plus 64)"
    );
    describe_gauge!(
        CACHE_MEMORY_CAPACITY,
        Unit::Bytes,
        "in-process cache tier: its bound (CACHE_MEMORY_BYTES)"
    );
    describe_gauge!(
        CACHE_HIT_RATIO,
        "hits (either tier) over hits + misses since start, by namespace; seed 003 alerts below 0.7"
    );
    describe_gauge!(
        BREAKER_STATE,
        "circuit breaker state: 0 closed, 1 half-open (probing), 2 open"
    );

    describe_gauge!(
        REDIS_UP,
        "1 if Redis answered PING within REDIS_TIMEOUT at scrape time"
    );
    describe_gauge!(
        REDIS_LATENCY,
        Unit::Seconds,
        "Redis PING round trip at scrape time"
    );
    describe_gauge!(
        REDIS_USED_MEMORY,
        Unit::Bytes,
        "Redis used_memory (INFO memory); NaN if unreadable"
    );
    describe_gauge!(
        REDIS_MAXMEMORY,
        Unit::Bytes,
        "Redis maxmemory (INFO memory); 0 means no limit"
    );
    describe_gauge!(
        REDIS_MEMORY_LIMIT,
        Unit::Bytes,
        "the denominator of cascade_redis_memory_used_ratio: maxmemory, or total_system_memory when maxmemory is 0"
    );
    describe_gauge!(
        REDIS_MEMORY_RATIO,
        "Redis used_memory / maxmemory (total_system_memory when maxmemory is 0); seed 003 alerts above 0.8"
    );

    describe_counter!(
        BUS_BLIND_WAITS,
        "invalidations that waited the bus's whole trust window because this instance did not hear the bus at that moment (instead of counting acknowledgements)"
    );
    describe_counter!(
        CACHE_LOG_WRITTEN,
        "invalidations this instance could not deliver to Redis or announce on the bus, written to the PostgreSQL invalidation log for the other instances"
    );
    describe_counter!(
        CACHE_LOG_WRITE_ERRORS,
        "undelivered invalidations that could not be written to the invalidation log either: other instances may serve the old value until its TTL"
    );
    describe_counter!(
        CACHE_LOG_DELIVERED,
        "invalidation log rows this instance delivered to Redis and announced, by by (self: rows it wrote, delivered by its replay or its reading of the log; peer: rows another instance wrote)"
    );
    describe_counter!(EVENTS_PUBLISHED, "domain events published by this instance");
    describe_counter!(
        EVENTS_PUBLISH_ERRORS,
        "domain events the transport (Redis pub/sub or PostgreSQL NOTIFY) did not take: other instances may not have them"
    );
    describe_counter!(
        EVENTS_RECEIVED,
        "domain events received from other instances"
    );
    describe_counter!(
        EVENTS_SUBSCRIPTIONS,
        "subscriptions to the events transport opened; more than one means it was lost and opened again"
    );
    describe_gauge!(WS_CONNECTIONS, "open WebSocket connections");
    describe_counter!(
        WS_MESSAGES,
        "WebSocket messages, by direction (in = from clients, out = to clients)"
    );
    describe_gauge!(
        WS_QUEUE_DEPTH,
        "messages waiting in WebSocket connections' send queues (each at most WS_QUEUE_SIZE)"
    );
    describe_counter!(
        WS_DROPPED,
        "messages not delivered to a WebSocket connection, by reason (queue_full: the connection is closed with 1013)"
    );
    describe_counter!(
        WS_CLOSES,
        "WebSocket connections closed, by reason (client, queue_full, unauthorized, auth_timeout, idle, shutdown, too_large, error)"
    );
    describe_counter!(
        WS_REJECTED,
        "WebSocket upgrades refused, by reason (instance_full, user_full, unauthorized)"
    );
    describe_histogram!(
        UPSTREAM_REQUEST_DURATION,
        Unit::Seconds,
        "third-party API calls, by upstream and outcome (ok, http_error, timeout, error)"
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "third-party API calls that failed, by upstream and kind"
    );
    describe_gauge!(
        UPSTREAM_BREAKER_STATE,
        "circuit breaker of each upstream: 0 closed, 1 half-open (one probe call), 2 open (calls skipped)"
    );
    describe_counter!(
        UPSTREAM_STALE_SERVED,
        "answers served from a copy older than its TTL because the upstream failed or its breaker was open (stale-if-error)"
    );
    describe_counter!(
        INTERACTIONS_DROPPED,
        "interaction log entries not written, by reason (buffer_full: INTERACTIONS_BUFFER was full; refused: PostgreSQL refused the batch; shutdown: still buffered when the shutdown flush ran out of time)"
    );
    describe_counter!(
        INTERACTIONS_WRITTEN,
        "interaction log entries written to PostgreSQL"
    );
    describe_gauge!(
        INTERACTIONS_BUFFERED,
        "interaction log entries waiting in memory to be written (at most INTERACTIONS_BUFFER)"
    );
}

/// Registers the metrics that exist before their first event at zero, so dashboards and
/// alerts see `0`, not an absent series.
pub fn register_zeroes() {
    counter!(BUS_BLIND_WAITS).absolute(0);
    counter!(CACHE_LOG_WRITTEN).absolute(0);
    counter!(CACHE_LOG_WRITE_ERRORS).absolute(0);
    for by in ["self", "peer"] {
        counter!(CACHE_LOG_DELIVERED, "by" => by).absolute(0);
    }
    for name in [
        EVENTS_PUBLISHED,
        EVENTS_PUBLISH_ERRORS,
        EVENTS_RECEIVED,
        EVENTS_SUBSCRIPTIONS,
    ] {
        counter!(name).absolute(0);
    }
    gauge!(WS_CONNECTIONS).set(0.0);
    gauge!(WS_QUEUE_DEPTH).set(0.0);
    for direction in [WsDirection::In, WsDirection::Out] {
        counter!(WS_MESSAGES, "direction" => direction.label()).absolute(0);
    }
}

/// The interaction log's series at zero (called by the module that keeps the log, when it
/// starts): `absolute(0)` on a counter that already counted would set it back, so this only
/// registers series that do not exist yet.
pub fn register_interaction_zeroes() {
    for reason in InteractionDrop::ALL {
        counter!(INTERACTIONS_DROPPED, "reason" => reason.label()).increment(0);
    }
    counter!(INTERACTIONS_WRITTEN).increment(0);
    gauge!(INTERACTIONS_BUFFERED).increment(0.0);
}

/// Why an interaction was not written (the `reason` of [`INTERACTIONS_DROPPED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InteractionDrop {
    BufferFull,
    Refused,
    Shutdown,
}

impl InteractionDrop {
    pub const ALL: [InteractionDrop; 3] = [
        InteractionDrop::BufferFull,
        InteractionDrop::Refused,
        InteractionDrop::Shutdown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            InteractionDrop::BufferFull => "buffer_full",
            InteractionDrop::Refused => "refused",
            InteractionDrop::Shutdown => "shutdown",
        }
    }
}

/// `n` interactions dropped for `reason`.
pub fn record_interactions_dropped(reason: InteractionDrop, n: u64) {
    counter!(INTERACTIONS_DROPPED, "reason" => reason.label()).increment(n);
}

/// `n` interactions written; `buffered` still waiting.
pub fn record_interactions_written(n: u64, buffered: usize) {
    counter!(INTERACTIONS_WRITTEN).increment(n);
    gauge!(INTERACTIONS_BUFFERED).set(buffered as f64);
}

/// Interactions waiting in memory to be written.
pub fn record_interactions_buffered(buffered: usize) {
    gauge!(INTERACTIONS_BUFFERED).set(buffered as f64);
}

/// A PostgreSQL pool acquisition that succeeded after `waited`.
pub fn record_pool_acquire(waited: Duration) {
    histogram!(PG_POOL_ACQUIRE_DURATION).record(waited.as_secs_f64());
}

/// Which way a WebSocket message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsDirection {
    /// From a client to the server.
    In,
    /// From the server to a client.
    Out,
}

impl WsDirection {
    fn label(self) -> &'static str {
        match self {
            WsDirection::In => "in",
            WsDirection::Out => "out",
        }
    }
}

/// Counts one open WebSocket connection for as long as it lives: hold it in the connection's
/// task, and the gauge goes down however the task ends (close, error, panic, shutdown).
#[must_use = "the connection counts as open only while the guard is alive"]
pub struct WsConnectionGuard(());

impl WsConnectionGuard {
    pub fn open() -> Self {
        gauge!(WS_CONNECTIONS).increment(1.0);
        WsConnectionGuard(())
    }
}

impl Drop for WsConnectionGuard {
    fn drop(&mut self) {
        gauge!(WS_CONNECTIONS).decrement(1.0);
    }
}

/// One WebSocket message sent or received.
pub fn record_ws_message(direction: WsDirection) {
    counter!(WS_MESSAGES, "direction" => direction.label()).increment(1);
}

/// How an upstream call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// A 2xx or 3xx answer.
    Ok,
    /// The upstream answered with a 4xx or 5xx.
    HttpError,
    /// No answer within the deadline.
    Timeout,
    /// Connection refused, TLS, DNS, a broken body…
    Error,
}

impl UpstreamOutcome {
    pub fn label(self) -> &'static str {
        match self {
            UpstreamOutcome::Ok => "ok",
            UpstreamOutcome::HttpError => "http_error",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::Error => "error",
        }
    }
}

/// One call to a third-party API (`upstream` is a fixed name chosen by the module that calls it,
/// never a URL, to bound the label's values).
pub fn record_upstream(upstream: &'static str, outcome: UpstreamOutcome, took: Duration) {
    histogram!(UPSTREAM_REQUEST_DURATION, "upstream" => upstream, "outcome" => outcome.label())
        .record(took.as_secs_f64());
    if outcome != UpstreamOutcome::Ok {
        counter!(UPSTREAM_ERRORS, "upstream" => upstream, "kind" => outcome.label()).increment(1);
    }
}

/// The circuit breaker of `upstream` changed state (0 closed, 1 half-open, 2 open).
pub fn record_upstream_breaker(upstream: &'static str, state: f64) {
    gauge!(UPSTREAM_BREAKER_STATE, "upstream" => upstream).set(state);
    upstream_states()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(upstream, state);
}

/// The last recorded breaker state of each upstream this process has a connector for, by
/// name: what `/health/db` reports beside the gauge (the same numbering).
pub fn upstream_breakers() -> Vec<(&'static str, f64)> {
    let states = upstream_states().lock().unwrap_or_else(|p| p.into_inner());
    states.iter().map(|(name, state)| (*name, *state)).collect()
}

fn upstream_states() -> &'static std::sync::Mutex<std::collections::BTreeMap<&'static str, f64>> {
    static STATES: std::sync::OnceLock<
        std::sync::Mutex<std::collections::BTreeMap<&'static str, f64>>,
    > = std::sync::OnceLock::new();
    STATES.get_or_init(Default::default)
}

/// An answer served stale because `upstream` could not give a fresh one.
pub fn record_upstream_stale(upstream: &'static str) {
    counter!(UPSTREAM_STALE_SERVED, "upstream" => upstream).increment(1);
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    /// The value of the series starting with `needle` in the rendered text.
    fn value(text: &str, needle: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {needle} in:\n{text}"))
    }

    #[test]
    fn websocket_connections_are_counted_while_open_and_messages_by_direction() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let first = WsConnectionGuard::open();
            let second = WsConnectionGuard::open();
            record_ws_message(WsDirection::In);
            for _ in 0..3 {
                record_ws_message(WsDirection::Out);
            }
            assert_eq!(value(&handle.render(), WS_CONNECTIONS), 2.0);
            drop(first);
            assert_eq!(value(&handle.render(), WS_CONNECTIONS), 1.0);
            drop(second);
        });
        let text = handle.render();
        assert_eq!(value(&text, WS_CONNECTIONS), 0.0);
        assert_eq!(
            value(&text, &format!("{WS_MESSAGES}{{direction=\"in\"}}")),
            1.0
        );
        assert_eq!(
            value(&text, &format!("{WS_MESSAGES}{{direction=\"out\"}}")),
            3.0
        );
    }
}
