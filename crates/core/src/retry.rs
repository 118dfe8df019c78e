//! Bounded retries with exponential backoff and full jitter.
//!
//! Startup uses this to reach PostgreSQL: retrying forever is how the seeds' backend hung, and
//! giving up at the first refusal would fail every deployment where the database starts a
//! second later than the service. So: retry, but inside a total bound, then fail loudly.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How a retry loop backs off and when it gives up.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max_delay: Duration,
    /// Total time after which no new attempt starts.
    pub total: Duration,
}

impl Backoff {
    pub fn within(total: Duration) -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            total,
        }
    }

    /// The delay before attempt `attempt + 1`: a random point in `[0, min(max, initial·2^n)]`
    /// ("full jitter"), so many instances restarting together do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// What a failed attempt means for the loop.
pub enum Attempt<E> {
    /// Worth trying again (refused, timed out, server starting up).
    Retry(E),
    /// Will not get better by waiting (bad password, unknown database).
    Fatal(E),
}

/// The outcome of a retry loop that gave up.
#[derive(Debug)]
pub struct GaveUp<E> {
    pub attempts: u32,
    pub elapsed: Duration,
    pub last: E,
}

/// Runs `op` until it succeeds, fails fatally, or `backoff.total` has passed.
pub async fn retry<T, E, F, Fut>(backoff: Backoff, mut op: F) -> Result<T, GaveUp<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match op(attempt).await {
            Ok(value) => return Ok(value),
            Err(Attempt::Fatal(last)) => {
                return Err(GaveUp {
                    attempts: attempt + 1,
                    elapsed: started.elapsed(),
                    last,
                });
            }
            Err(Attempt::Retry(last)) => {
                let delay = backoff.delay(attempt);
                attempt += 1;
                if started.elapsed() + delay >= backoff.total {
                    return Err(GaveUp {
                        attempts: attempt,
                        elapsed: started.elapsed(),
                        last,
                    });
                }
                tracing::debug!(attempt, ?delay, "retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_but_stay_under_the_cap() {
        let b = Backoff::within(Duration::from_secs(30));
        for attempt in 0..40 {
            assert!(b.delay(attempt) <= b.max_delay);
        }
        assert!(b.delay(0) <= b.initial);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_within_the_total_bound() {
        let started = tokio::time::Instant::now();
        let result: Result<(), GaveUp<&str>> =
            retry(Backoff::within(Duration::from_secs(5)), |_| async {
                Err(Attempt::Retry("refused"))
            })
            .await;
        let gave_up = result.unwrap_err();
        assert!(gave_up.attempts > 1);
        assert!(started.elapsed() <= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn fatal_errors_stop_at_once() {
        let result: Result<(), GaveUp<&str>> =
            retry(Backoff::within(Duration::from_secs(5)), |_| async {
                Err(Attempt::Fatal("bad password"))
            })
            .await;
        assert_eq!(result.unwrap_err().attempts, 1);
    }

    #[tokio::test]
    async fn succeeds_after_transient_failures() {
        let result: Result<u32, GaveUp<&str>> =
            retry(Backoff::within(Duration::from_secs(5)), |n| async move {
                if n < 3 {
                    Err(Attempt::Retry("not yet"))
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(result.unwrap(), 3);
    }
}
