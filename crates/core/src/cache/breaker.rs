//! A circuit breaker in front of the shared (Redis) tier.
//!
//! Closed: calls go through. After `threshold` consecutive failures it opens: calls are
//! skipped (the engine serves from the near cache and the loader) for `cool_down`. Then one
//! caller at a time is let through as a probe (half-open); a success closes it. The engine
//! replays the invalidations it could not deliver before it treats Redis as trustworthy again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

pub(crate) struct Breaker {
    threshold: u32,
    cool_down: Duration,
    /// Closed with no failure counted: the hot path (every shared-tier hit) reads only this.
    healthy: AtomicBool,
    inner: Mutex<Inner>,
}

struct Inner {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// What the breaker lets a caller do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: go ahead.
    Call,
    /// Half-open and this caller is the probe: go ahead, and report the outcome.
    Probe,
    /// Open: skip the shared tier.
    Skip,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            healthy: AtomicBool::new(true),
            inner: Mutex::new(Inner {
                failures: 0,
                open_until: None,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn permit(&self) -> Permit {
        if self.healthy.load(Ordering::SeqCst) {
            return Permit::Call;
        }
        let mut inner = self.lock();
        match inner.open_until {
            None => Permit::Call,
            Some(until) if Instant::now() < until => Permit::Skip,
            Some(_) if inner.probing => Permit::Skip,
            Some(_) => {
                inner.probing = true;
                Permit::Probe
            }
        }
    }

    pub fn success(&self) {
        if self.healthy.load(Ordering::SeqCst) {
            return;
        }
        let mut inner = self.lock();
        inner.failures = 0;
        inner.open_until = None;
        inner.probing = false;
        self.healthy.store(true, Ordering::SeqCst);
    }

    /// Records a failure; returns true when this failure opened the breaker.
    pub fn failure(&self) -> bool {
        let mut inner = self.lock();
        self.healthy.store(false, Ordering::SeqCst);
        inner.failures += 1;
        inner.probing = false;
        let was_closed = inner.open_until.is_none();
        if inner.failures >= self.threshold || !was_closed {
            inner.open_until = Some(Instant::now() + self.cool_down);
        }
        was_closed && inner.open_until.is_some()
    }

    /// Opens the breaker now, whatever the count: Redis must not be read until pending work
    /// has been delivered.
    pub fn trip(&self) {
        let mut inner = self.lock();
        self.healthy.store(false, Ordering::SeqCst);
        inner.probing = false;
        inner.open_until = Some(Instant::now() + self.cool_down);
    }

    /// A probe ended without a verdict (it could not replay pending work): back to open.
    pub fn abandon_probe(&self) {
        let mut inner = self.lock();
        self.healthy.store(false, Ordering::SeqCst);
        inner.probing = false;
        inner.open_until = Some(Instant::now() + self.cool_down);
    }

    pub fn state(&self) -> BreakerState {
        if self.healthy.load(Ordering::SeqCst) {
            return BreakerState::Closed;
        }
        let inner = self.lock();
        match inner.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_one_at_a_time() {
        let b = Breaker::new(2, Duration::from_millis(20));
        assert_eq!(b.permit(), Permit::Call);
        assert!(!b.failure());
        assert!(b.failure());
        assert_eq!(b.permit(), Permit::Skip);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Skip, "only one probe at a time");
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.permit(), Permit::Call);
    }
}
