//! The circuit breaker of one upstream.
//!
//! Closed: calls go through. After `threshold` consecutive failed calls it opens: calls are
//! not made (the connector serves a stale copy or a 503) for `cool_down`. Then one call at a
//! time is let through as a probe (half-open): a success closes the breaker, a failure opens
//! it for another `cool_down`. It closes by itself once the upstream answers again; nobody
//! has to reset it.
//!
//! Not the cache engine's breaker (`cache/breaker.rs`), though the shape is the same: that
//! one guards Redis and replays invalidations before closing; this one counts whole calls
//! (retries included) and reports its state per upstream in `/metrics`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cache::BreakerState;
use crate::metrics;

pub(crate) struct Breaker {
    upstream: &'static str,
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
}

struct State {
    failures: u32,
    open_until: Option<Instant>,
    /// Since when a probe has been out. A probe that never reports (its caller's request was
    /// dropped mid-call) stops counting after `cool_down`, and the next caller probes.
    probing: Option<Instant>,
}

/// What the breaker lets a caller do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: call.
    Call,
    /// Half-open and this caller is the probe: call, and report the outcome.
    Probe,
    /// Open (or another caller is probing): do not call.
    Skip,
}

impl Breaker {
    pub fn new(upstream: &'static str, threshold: u32, cool_down: Duration) -> Breaker {
        metrics::record_upstream_breaker(upstream, 0.0);
        Breaker {
            upstream,
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(State {
                failures: 0,
                open_until: None,
                probing: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn permit(&self) -> Permit {
        let mut state = self.lock();
        match state.open_until {
            None => Permit::Call,
            Some(until) if Instant::now() < until => Permit::Skip,
            Some(_)
                if state
                    .probing
                    .is_some_and(|at| at.elapsed() < self.cool_down) =>
            {
                Permit::Skip
            }
            Some(_) => {
                state.probing = Some(Instant::now());
                metrics::record_upstream_breaker(self.upstream, 1.0);
                Permit::Probe
            }
        }
    }

    pub fn success(&self) {
        let mut state = self.lock();
        let was_open = state.open_until.is_some();
        state.failures = 0;
        state.open_until = None;
        state.probing = None;
        if was_open {
            tracing::info!(
                upstream = self.upstream,
                "upstream answers again: breaker closed"
            );
            metrics::record_upstream_breaker(self.upstream, 0.0);
        }
    }

    /// Records a failed call; returns true when it opened the breaker.
    pub fn failure(&self) -> bool {
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        let was_closed = state.open_until.is_none();
        state.probing = None;
        if state.failures >= self.threshold || !was_closed {
            state.open_until = Some(Instant::now() + self.cool_down);
            metrics::record_upstream_breaker(self.upstream, 2.0);
            if was_closed {
                tracing::warn!(
                    upstream = self.upstream,
                    failures = state.failures,
                    cool_down = ?self.cool_down,
                    "upstream failing: breaker open"
                );
            }
        }
        was_closed && state.open_until.is_some()
    }

    pub fn state(&self) -> BreakerState {
        let state = self.lock();
        match state.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// How long until a call may be tried again: what `Retry-After` says (at least 1 s).
    pub fn retry_after(&self) -> Duration {
        let state = self.lock();
        let left = state.open_until.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        });
        left.max(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_one_at_a_time_and_closes_on_success() {
        let b = Breaker::new("test", 2, Duration::from_millis(20));
        assert_eq!(b.permit(), Permit::Call);
        assert!(!b.failure());
        assert!(b.failure());
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.permit(), Permit::Skip);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Skip, "only one probe at a time");
        assert!(
            !b.failure(),
            "a failed probe re-opens, it does not count as opening"
        );
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.permit(), Permit::Probe);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.permit(), Permit::Call);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_keep_the_breaker_open() {
        let b = Breaker::new("test", 1, Duration::from_millis(20));
        assert!(b.failure());
        std::thread::sleep(Duration::from_millis(30));
        // The probe's caller is dropped mid-call: neither success nor failure is reported.
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Skip, "the probe is out");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            b.permit(),
            Permit::Probe,
            "an abandoned probe stops counting"
        );
        b.success();
        assert_eq!(b.permit(), Permit::Call);
    }
}
