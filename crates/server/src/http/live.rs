//! The dashboard's charts: one [`Sample`] of the server's health every [`EVERY`], the last
//! [`WINDOW`] of them kept in memory and served by `GET /metrics/live`, each new one also handed
//! to whoever listens ([`Live::subscribe`]: the real-time `admin:metrics` channel).
//!
//! A sample is computed from the same exposition text `/metrics` serves (refreshed the same
//! way), so the charts and a Prometheus scrape never disagree. Rates and latency quantiles are
//! taken over the interval since the previous sample, not since start: a chart shows what is
//! happening now.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::state::ServerState;

/// Time between two samples.
pub const EVERY: Duration = Duration::from_secs(1);
/// How far back `GET /metrics/live` reaches: the dashboard's charts span this.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Samples kept: [`WINDOW`] / [`EVERY`].
const CAPACITY: usize = (WINDOW.as_secs() / EVERY.as_secs()) as usize;

/// Routes of the operators' own tools, left out of request rates and latency (a dashboard left
/// open would otherwise chart itself).
pub const OWN_ROUTES: [&str; 3] = ["/metrics", "/metrics/live", "/dashboard"];

/// Seed 003's alerting thresholds, drawn as lines on the charts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Thresholds {
    /// A namespace's hit ratio below this is an alert.
    pub hit_ratio: f64,
    /// p95 latency above this (milliseconds) is an alert.
    pub p95_ms: f64,
    /// Pool in use / max above this is an alert.
    pub pool: f64,
    /// Redis used / limit above this is an alert.
    pub redis_memory: f64,
}

pub const THRESHOLDS: Thresholds = Thresholds {
    hit_ratio: 0.70,
    p95_ms: 500.0,
    pool: 0.80,
    redis_memory: 0.80,
};

/// One point of every chart. Absent values (`null`) are "nothing to measure": no request in the
/// interval, no Redis configured, a probe that failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Unix milliseconds when it was taken.
    pub t: i64,
    /// The instance that took it (the domain events' instance id).
    pub instance: String,
    pub requests_per_s: f64,
    pub errors_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Hits / (hits + misses) per cache namespace over the interval; only namespaces that
    /// were read in it.
    pub hit_ratio: BTreeMap<String, f64>,
    pub pool_in_use: Option<f64>,
    pub pool_max: Option<f64>,
    pub redis_used_bytes: Option<f64>,
    pub redis_limit_bytes: Option<f64>,
    /// The in-process tier: entries, their weight (what `CACHE_MEMORY_BYTES` bounds) and the
    /// bound; absent without the tier.
    pub cache_memory_entries: Option<f64>,
    pub cache_memory_weighted_bytes: Option<f64>,
    pub cache_memory_capacity_bytes: Option<f64>,
    pub ws_connections: Option<f64>,
    pub ws_in_per_s: f64,
    pub ws_out_per_s: f64,
    /// The agents module's queue (absent when the module reports nothing): executions
    /// queued and running, how long the oldest due one has waited, attempts completed per
    /// second by this instance, and claims rescued from silent workers in the interval.
    pub executions_queued: Option<f64>,
    pub executions_running: Option<f64>,
    pub executions_oldest_queued_s: Option<f64>,
    pub executions_completed_per_s: f64,
    pub executions_rescued: f64,
}

/// The window of samples and the feed of new ones. Cheap to clone.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    instance: String,
    window: Mutex<VecDeque<Arc<Sample>>>,
    feed: broadcast::Sender<Arc<Sample>>,
}

impl Live {
    pub fn new(instance: impl Into<String>) -> Live {
        Live {
            inner: Arc::new(Inner {
                instance: instance.into(),
                window: Mutex::new(VecDeque::with_capacity(CAPACITY)),
                feed: broadcast::channel(64).0,
            }),
        }
    }

    /// Every new sample, as it is taken. A listener that falls behind loses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Sample>> {
        self.inner.feed.subscribe()
    }

    /// The samples taken after `after_ms` (all of the window when `None`), oldest first.
    pub fn since(&self, after_ms: Option<i64>) -> Vec<Arc<Sample>> {
        let window = self.lock();
        window
            .iter()
            .filter(|s| after_ms.is_none_or(|after| s.t > after))
            .cloned()
            .collect()
    }

    fn push(&self, sample: Sample) {
        let sample = Arc::new(sample);
        {
            let mut window = self.lock();
            if window.len() == CAPACITY {
                window.pop_front();
            }
            window.push_back(sample.clone());
        }
        // Nobody listening is fine.
        let _ = self.inner.feed.send(sample);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Sample>>> {
        self.inner.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a sample every [`EVERY`] until `stop`.
    pub async fn run(self, state: ServerState, mut stop: cascade_core::shutdown::ShutdownSignal) {
        let mut previous: Option<(Exposition, Instant)> = None;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tick.tick() => {}
            }
            let text = crate::http::metrics::refreshed(&state).await;
            let now = Exposition::parse(&text);
            let at = Instant::now();
            if let Some((before, then)) = &previous {
                let seconds = at.duration_since(*then).as_secs_f64();
                self.push(sample(
                    &self.inner.instance,
                    unix_ms(),
                    &now,
                    before,
                    seconds,
                ));
            }
            previous = Some((now, at));
        }
    }
}

/// The real-time channel that carries each new sample (readable with the ADMIN_TOKEN only).
pub const CHANNEL: &str = "admin:metrics";

/// Publishes every new sample on [`CHANNEL`] until `stop`. A sample that cannot be published
/// (Redis down) is skipped: the next one follows a second later, and `/metrics/live` has them
/// all.
pub async fn publish(
    mut feed: broadcast::Receiver<Arc<Sample>>,
    realtime: cascade_realtime::Realtime,
    mut stop: cascade_core::shutdown::ShutdownSignal,
) {
    loop {
        let sample = tokio::select! {
            _ = stop.recv() => return,
            sample = feed.recv() => sample,
        };
        let sample = match sample {
            Ok(sample) => sample,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let payload = match serde_json::to_value(&*sample) {
            Ok(payload) => payload,
            Err(err) => {
                tracing::warn!(error = %err, "a dashboard sample could not be encoded");
                continue;
            }
        };
        if let Err(err) = realtime.publish(CHANNEL, payload).await {
            tracing::debug!(error = %err, "a dashboard sample was not published");
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The query of `GET /metrics/live`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LiveQuery {
    /// Only samples taken after this Unix millisecond (the last one a poller has).
    after: Option<i64>,
}

/// The answer of `GET /metrics/live`.
#[derive(Serialize)]
struct LiveBody<'a> {
    instance: &'a str,
    every_ms: u64,
    window_ms: u64,
    thresholds: Thresholds,
    samples: Vec<&'a Sample>,
}

#[utoipa::path(get, path = "/metrics/live", tag = "operations", params(LiveQuery),
    responses((status = 200, description = "The last 15 minutes of per-second samples (requests/s, p50/p95/p99, hit ratio per namespace, pool, Redis memory, WebSocket connections) and seed 003's thresholds: the dashboard's charts", content_type = "application/json", body = Object))
)]
pub async fn live(State(state): State<ServerState>, Query(q): Query<LiveQuery>) -> Response {
    let samples = state.live.since(q.after);
    Json(LiveBody {
        instance: &state.live.inner.instance,
        every_ms: EVERY.as_millis() as u64,
        window_ms: WINDOW.as_millis() as u64,
        thresholds: THRESHOLDS,
        samples: samples.iter().map(|s| &**s).collect(),
    })
    .into_response()
}

/// One series of the exposition: its labels, sorted, and its value.
type Labels = Vec<(String, String)>;

/// The Prometheus text exposition, parsed: name → its series. Only what Cascade itself renders
/// has to be understood (no timestamps, no exemplars).
#[derive(Debug, Default)]
pub struct Exposition {
    series: HashMap<String, Vec<(Labels, f64)>>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut series: HashMap<String, Vec<(Labels, f64)>> = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((name, labels, value)) = parse_line(line) {
                series.entry(name).or_default().push((labels, value));
            }
        }
        Exposition { series }
    }

    fn all<'a>(&'a self, name: &str) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
        self.series
            .get(name)
            .into_iter()
            .flatten()
            .map(|(labels, value)| (labels, *value))
    }

    /// The sum of the series of `name` whose labels pass `keep`.
    fn sum(&self, name: &str, keep: impl Fn(&Labels) -> bool) -> f64 {
        self.all(name)
            .filter(|(labels, _)| keep(labels))
            .map(|(_, v)| v)
            .filter(|v| v.is_finite())
            .sum()
    }

    /// The value of an unlabelled series, when it is there and a number.
    fn one(&self, name: &str) -> Option<f64> {
        self.all(name).map(|(_, v)| v).find(|v| v.is_finite())
    }

    /// A histogram's cumulative buckets summed over the series that pass `keep`, by upper
    /// bound, ascending.
    fn buckets(&self, name: &str, keep: impl Fn(&Labels) -> bool) -> Vec<(f64, f64)> {
        let mut by: BTreeMap<OrderedBound, f64> = BTreeMap::new();
        for (labels, value) in self.all(&format!("{name}_bucket")) {
            if !keep(labels) {
                continue;
            }
            let Some(le) = label(labels, "le").and_then(parse_value) else {
                continue;
            };
            *by.entry(OrderedBound(le)).or_default() += value;
        }
        by.into_iter().map(|(le, count)| (le.0, count)).collect()
    }
}

/// An `le` bound as a map key (they are never NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);
impl Eq for OrderedBound {}
impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn label<'a>(labels: &'a Labels, key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn parse_value(raw: &str) -> Option<f64> {
    match raw {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => raw.parse().ok(),
    }
}

/// `name{k="v",…} value` or `name value`.
fn parse_line(line: &str) -> Option<(String, Labels, f64)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some(&(i, '}')) => {
                    end = Some(i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, other)) => value.push(other),
                        None => return None,
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return None;
            }
            labels.push((key, value));
        }
        &body[end? + 1..]
    } else {
        rest
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    labels.sort();
    Some((name.to_string(), labels, value))
}

/// Prometheus's `histogram_quantile`: linear interpolation inside the bucket holding the rank.
/// `None` without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(upper, count) in buckets {
        if count >= rank {
            if upper.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (upper - lower) * (rank - below) / (count - below));
        }
        lower = upper;
        below = count;
    }
    None
}

/// `now − before`, bucket by bucket.
fn minus(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(le, count)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (count - old).max(0.0))
        })
        .collect()
}

const REQUESTS: &str = cascade_core::metrics::HTTP_REQUESTS;
const DURATION: &str = cascade_core::metrics::HTTP_REQUEST_DURATION;

fn application(labels: &Labels) -> bool {
    label(labels, "route").is_none_or(|route| !OWN_ROUTES.contains(&route))
}

/// The sample for the interval between `before` and `now`, `seconds` long.
pub fn sample(
    instance: &str,
    t: i64,
    now: &Exposition,
    before: &Exposition,
    seconds: f64,
) -> Sample {
    use cascade_agents::worker as agents;
    use cascade_core::metrics as m;
    let rate = |name: &str, keep: &dyn Fn(&Labels) -> bool| {
        ((now.sum(name, keep) - before.sum(name, keep)) / seconds.max(1e-3)).max(0.0)
    };
    let requests_per_s = rate(REQUESTS, &application);
    let errors_per_s = rate(REQUESTS, &|l: &Labels| {
        application(l) && label(l, "status").is_some_and(|s| s.starts_with('5'))
    });
    let recent = minus(
        &now.buckets(DURATION, application),
        &before.buckets(DURATION, application),
    );
    let ms = |q: f64| quantile(q, &recent).map(|s| s * 1000.0);

    let mut hit_ratio = BTreeMap::new();
    let namespaces: std::collections::BTreeSet<&str> = now
        .all(m::CACHE_HIT_RATIO)
        .filter_map(|(labels, _)| label(labels, "namespace"))
        .collect();
    for ns in namespaces {
        let of = |l: &Labels| label(l, "namespace") == Some(ns);
        let hits = now.sum(m::CACHE_HITS, of) - before.sum(m::CACHE_HITS, of);
        let misses = now.sum(m::CACHE_MISSES, of) - before.sum(m::CACHE_MISSES, of);
        if hits + misses > 0.0 {
            hit_ratio.insert(ns.to_string(), (hits / (hits + misses)).clamp(0.0, 1.0));
        }
    }
    let direction = |d: &'static str| move |l: &Labels| label(l, "direction") == Some(d);
    Sample {
        t,
        instance: instance.to_string(),
        requests_per_s,
        errors_per_s,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        hit_ratio,
        pool_in_use: now.one(m::PG_POOL_IN_USE),
        pool_max: now.one(m::PG_POOL_MAX_SIZE),
        redis_used_bytes: now.one(m::REDIS_USED_MEMORY),
        redis_limit_bytes: now.one(m::REDIS_MEMORY_LIMIT),
        cache_memory_entries: now.one(m::CACHE_MEMORY_ENTRIES),
        cache_memory_weighted_bytes: now.one(m::CACHE_MEMORY_WEIGHTED),
        cache_memory_capacity_bytes: now.one(m::CACHE_MEMORY_CAPACITY),
        ws_connections: now.one(m::WS_CONNECTIONS),
        ws_in_per_s: rate(m::WS_MESSAGES, &direction("in")),
        ws_out_per_s: rate(m::WS_MESSAGES, &direction("out")),
        executions_queued: now.one(agents::QUEUED),
        executions_running: now.one(agents::RUNNING),
        executions_oldest_queued_s: now.one(agents::OLDEST_QUEUED),
        executions_completed_per_s: rate(agents::COMPLETED, &|_| true),
        executions_rescued: (now.sum(agents::RESCUED, |_| true)
            - before.sum(agents::RESCUED, |_| true))
        .max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP cascade_http_requests_total x
# TYPE cascade_http_requests_total counter
cascade_http_requests_total{method="GET",route="/listings/{id}",status="200"} 100
cascade_http_requests_total{method="GET",route="/metrics",status="200"} 7
cascade_http_request_duration_seconds_bucket{method="GET",route="/listings/{id}",status="200",le="0.001"} 50
cascade_http_request_duration_seconds_bucket{method="GET",route="/listings/{id}",status="200",le="0.01"} 100
cascade_http_request_duration_seconds_bucket{method="GET",route="/listings/{id}",status="200",le="+Inf"} 100
cascade_cache_hits_total{namespace="listings",tier="near"} 10
cascade_cache_misses_total{namespace="listings"} 10
cascade_cache_hit_ratio{namespace="listings"} 0.5
cascade_pg_pool_in_use 3
cascade_pg_pool_max_size 16
cascade_redis_used_memory_bytes NaN
cascade_ws_messages_total{direction="in"} 0
cascade_executions_completed_total 1000
cascade_executions_rescued_total 2
"#;

    const NOW: &str = r#"cascade_http_requests_total{method="GET",route="/listings/{id}",status="200"} 300
cascade_http_requests_total{method="GET",route="/listings/{id}",status="503"} 20
cascade_http_requests_total{method="GET",route="/metrics",status="200"} 900
cascade_http_request_duration_seconds_bucket{method="GET",route="/listings/{id}",status="200",le="0.001"} 50
cascade_http_request_duration_seconds_bucket{method="GET",route="/listings/{id}",status="200",le="0.01"} 300
cascade_http_request_duration_seconds_bucket{method="GET",route="/listings/{id}",status="200",le="+Inf"} 300
cascade_http_request_duration_seconds_bucket{method="GET",route="/metrics",status="200",le="0.001"} 900
cascade_http_request_duration_seconds_bucket{method="GET",route="/metrics",status="200",le="+Inf"} 900
cascade_cache_hits_total{namespace="listings",tier="near"} 100
cascade_cache_hits_total{namespace="listings",tier="shared"} 20
cascade_cache_misses_total{namespace="listings"} 30
cascade_cache_hit_ratio{namespace="listings"} 0.75
cascade_cache_hit_ratio{namespace="idle"} 0
cascade_pg_pool_in_use 5
cascade_pg_pool_max_size 16
cascade_redis_used_memory_bytes NaN
cascade_ws_messages_total{direction="in"} 40
cascade_cache_memory_entries 12
cascade_cache_memory_weighted_bytes 4096
cascade_cache_memory_capacity_bytes 67108864
cascade_label_escapes{path="a\"b\\c"} 1
cascade_executions_queued 42
cascade_executions_running 4
cascade_executions_oldest_queued_seconds 1.5
cascade_executions_completed_total 1600
cascade_executions_rescued_total 5
"#;

    #[test]
    fn a_sample_is_the_interval_between_two_expositions() {
        let s = sample(
            "i",
            1,
            &Exposition::parse(NOW),
            &Exposition::parse(BEFORE),
            2.0,
        );
        // 220 application requests in 2 s; /metrics is the operators' own and left out.
        assert_eq!(s.requests_per_s, 110.0);
        assert_eq!(s.errors_per_s, 10.0);
        // The interval's 200 requests all fell in (1 ms, 10 ms]: the median is interpolated
        // inside that bucket, and /metrics' sub-millisecond answers do not pull it down.
        let p50 = s.p50_ms.unwrap();
        assert!((p50 - 5.5).abs() < 1e-9, "{p50}");
        assert!(s.p99_ms.unwrap() > p50);
        // 110 hits and 20 misses in the interval; a namespace nobody read has no point.
        let ratio = s.hit_ratio["listings"];
        assert!((ratio - 110.0 / 130.0).abs() < 1e-9, "{ratio}");
        assert!(!s.hit_ratio.contains_key("idle"));
        assert_eq!(s.pool_in_use, Some(5.0));
        assert_eq!(s.pool_max, Some(16.0));
        // NaN (Redis unreadable) is no value, not a zero on the chart.
        assert_eq!(s.redis_used_bytes, None);
        assert_eq!(s.ws_in_per_s, 20.0);
        // The in-process tier's gauges as they are now.
        assert_eq!(s.cache_memory_entries, Some(12.0));
        assert_eq!(s.cache_memory_weighted_bytes, Some(4096.0));
        assert_eq!(s.cache_memory_capacity_bytes, Some(67108864.0));
        // The agents module's queue: gauges as they are, counters over the interval.
        assert_eq!(s.executions_queued, Some(42.0));
        assert_eq!(s.executions_running, Some(4.0));
        assert_eq!(s.executions_oldest_queued_s, Some(1.5));
        assert_eq!(s.executions_completed_per_s, 300.0);
        assert_eq!(s.executions_rescued, 3.0);
    }

    #[test]
    fn quiet_intervals_have_no_latency() {
        let e = Exposition::parse(BEFORE);
        let s = sample("i", 1, &e, &e, 1.0);
        assert_eq!(s.requests_per_s, 0.0);
        assert_eq!(s.p95_ms, None);
        assert!(s.hit_ratio.is_empty());
        // No in-process tier reported: no point, not a zero.
        assert_eq!(s.cache_memory_weighted_bytes, None);
    }

    #[test]
    fn label_values_are_unescaped() {
        let e = Exposition::parse(NOW);
        let (labels, value) = e.all("cascade_label_escapes").next().unwrap();
        assert_eq!(label(labels, "path"), Some("a\"b\\c"));
        assert_eq!(value, 1.0);
        assert!(parse_line("broken{a=\"x} 1").is_none());
        assert!(parse_line("no_value").is_none());
    }

    #[test]
    fn the_window_keeps_fifteen_minutes() {
        let live = Live::new("i");
        let mut feed = live.subscribe();
        live.push(sample(
            "i",
            0,
            &Exposition::default(),
            &Exposition::default(),
            1.0,
        ));
        assert_eq!(feed.try_recv().unwrap().t, 0);
        for t in 1..(CAPACITY as i64 + 10) {
            live.push(sample(
                "i",
                t,
                &Exposition::default(),
                &Exposition::default(),
                1.0,
            ));
        }
        let all = live.since(None);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].t, 10);
        assert_eq!(live.since(Some(CAPACITY as i64 + 7)).len(), 2);
    }
}
