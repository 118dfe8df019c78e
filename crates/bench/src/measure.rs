//! Timing operations in-process: the cache and catalog benches' cases, and the suite's own
//! clients (the stampede, the outages). wrk measures the suite's throughput scenarios itself.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One measured case: throughput over the whole case, latency per operation.
pub struct Case {
    pub name: &'static str,
    pub ops_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// Runs `ops` operations from `concurrency` tasks, each task its equal share (`op(i)` gets a
/// distinct `i`, so a case can walk distinct keys).
pub async fn measure<F, Fut>(name: &'static str, ops: usize, concurrency: usize, op: F) -> Case
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let concurrency = concurrency.max(1);
    let per_task = ops / concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let begun = Instant::now();
                op(t * per_task + i).await;
                latencies.push(begun.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(ops);
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    let (p50, p99) = percentiles(&mut all);
    Case {
        name,
        ops_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50,
        p99,
    }
}

/// The median and the 99th percentile (zero for no samples); sorts `latencies`.
pub fn percentiles(latencies: &mut [Duration]) -> (Duration, Duration) {
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(index).copied().unwrap_or_default()
    };
    (at(0.50), at(0.99))
}

/// Milliseconds, as the tables print them.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_no_samples_are_zero() {
        assert_eq!(percentiles(&mut []), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let (p50, p99) = percentiles(&mut samples);
        assert_eq!(p50, Duration::from_millis(51));
        assert_eq!(p99, Duration::from_millis(100));
    }
}
