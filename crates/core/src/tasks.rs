//! Background tasks, owned: started under one [`Supervisor`], which reports a task that fails
//! or ends on its own, and on shutdown signals them all and waits for each, for a bounded time.
//!
//! Every task is `async fn(..., ShutdownSignal)` that selects on the signal in its loop (the
//! pool's top-up, the cache's cleanup, session cleanup, metric upkeep, a module's syncs).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinHandle;

use crate::shutdown::{Shutdown, ShutdownSignal};

/// Owns the background tasks of one application.
pub struct Supervisor {
    shutdown: Shutdown,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// Tasks that panicked or returned before shutdown (each also logged when it happens).
    failures: Arc<AtomicU64>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor {
            shutdown: Shutdown::new(),
            tasks: Vec::new(),
            failures: Arc::default(),
        }
    }

    /// A signal that fires when [`stop`](Self::stop) is called.
    pub fn signal(&self) -> ShutdownSignal {
        self.shutdown.signal()
    }

    /// Starts `task` with its shutdown signal. A panic or an early return is logged with the
    /// task's name at once (not when the application stops) and counted.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(ShutdownSignal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let signal = self.shutdown.signal();
        let stopping = self.shutdown.signal();
        let failures = self.failures.clone();
        let future = task(signal);
        let handle = tokio::spawn(async move {
            match AssertUnwindSafe(future).catch_unwind().await {
                Ok(()) if stopping.is_triggered() => {}
                Ok(()) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(task = name, "background task ended before shutdown");
                }
                Err(panic) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(task = name, panic = message, "background task panicked");
                }
            }
        });
        self.tasks.push((name, handle));
    }

    /// Tasks that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Names of the tasks started, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(name, _)| *name).collect()
    }

    /// Signals every task and waits for each to finish, `bound` in all; a task still running
    /// then is aborted and named in the log.
    pub async fn stop(mut self, bound: Duration) {
        self.shutdown.trigger();
        let deadline = tokio::time::Instant::now() + bound;
        for (name, mut handle) in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                tracing::warn!(task = name, "background task did not stop in time; aborted");
                handle.abort();
            }
        }
    }
}

/// Work that must finish even when whoever asked for it goes away: a write's commit and its
/// invalidations, a revocation. A client that hangs up drops the request's future, and with it
/// anything that future was running, so such work runs in a task of its own that the caller
/// awaits. The tasks are counted, so the application waits for them when it stops (a write
/// whose client left is not cut short by a shutdown), and bounded in number, so clients that
/// send work and hang up cannot pile it up without limit: past the bound, new work waits for a
/// place (inside the request's own deadline).
#[derive(Clone)]
pub struct Detached {
    inner: Arc<DetachedInner>,
}

struct DetachedInner {
    places: Arc<tokio::sync::Semaphore>,
    running: AtomicU64,
    idle: tokio::sync::Notify,
}

/// Counts a running task out when it ends, however it ends (a panic included).
struct Running(Arc<DetachedInner>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The work was not run: the application is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the application is stopping: the operation was not started")]
pub struct Stopping;

impl Detached {
    /// At most `max` pieces of work at once.
    pub fn new(max: usize) -> Detached {
        Detached {
            inner: Arc::new(DetachedInner {
                places: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
                running: AtomicU64::new(0),
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Runs `work` to completion in a task of its own and returns its result. If the caller is
    /// dropped while it runs, it still finishes. A panic in `work` resumes in the caller.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, Stopping> {
        let place = self
            .inner
            .places
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Stopping)?;
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.inner.clone());
        let task = tokio::spawn(async move {
            let _running = running;
            let _place = place;
            work.await
        });
        match task.await {
            Ok(out) => Ok(out),
            Err(err) => match err.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(Stopping),
            },
        }
    }

    /// Refuses new work and waits, at most `bound`, for the running work to end. True when
    /// none is left.
    pub async fn finish(&self, bound: Duration) -> bool {
        self.inner.places.close();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let idle = self.inner.idle.notified();
            if self.inner.running.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                let left = self.inner.running.load(Ordering::SeqCst);
                tracing::warn!(
                    left,
                    "detached work still running at shutdown; not waited for"
                );
                return left == 0;
            }
        }
    }
}

/// Dropped without [`stop`](Supervisor::stop) (an error path of the application's build): the
/// tasks are told to stop, so none of them runs on, or reports an early end, as a failure.
impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_signals_and_joins_every_task() {
        let mut supervisor = Supervisor::new();
        let stopped = Arc::new(AtomicU64::new(0));
        for name in ["a", "b"] {
            let stopped = stopped.clone();
            supervisor.spawn(name, |mut signal| async move {
                signal.recv().await;
                stopped.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(supervisor.names(), ["a", "b"]);
        supervisor.stop(Duration::from_secs(5)).await;
        assert_eq!(stopped.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_panic_or_an_early_return_is_a_failure() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("panics", |_| async { panic!("boom") });
        supervisor.spawn("returns", |_| async {});
        supervisor.spawn("waits", |mut signal| async move { signal.recv().await });
        for _ in 0..100 {
            if supervisor.failures() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(supervisor.failures(), 2);
        let failures = supervisor.failures.clone();
        supervisor.stop(Duration::from_secs(5)).await;
        assert_eq!(
            failures.load(Ordering::Relaxed),
            2,
            "a task stopped by shutdown is no failure"
        );
    }

    #[tokio::test]
    async fn dropping_the_supervisor_stops_its_tasks_without_failures() {
        let mut supervisor = Supervisor::new();
        let stopped = Arc::new(AtomicU64::new(0));
        let counter = stopped.clone();
        supervisor.spawn("waits", |mut signal| async move {
            signal.recv().await;
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let failures = supervisor.failures.clone();
        drop(supervisor);
        for _ in 0..100 {
            if stopped.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
        assert_eq!(failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn detached_work_finishes_when_its_caller_goes_away_and_finish_waits_for_it() {
        let detached = Detached::new(4);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        let caller = tokio::spawn({
            let detached = detached.clone();
            async move {
                detached
                    .run(async move {
                        let _ = rx.await;
                        counter.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        caller.abort();
        // The caller is gone; the work is not. Stopping waits for it.
        let finishing = tokio::spawn({
            let detached = detached.clone();
            async move { detached.finish(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !finishing.is_finished(),
            "finish waits for the running work"
        );
        tx.send(()).unwrap();
        assert!(finishing.await.unwrap());
        assert_eq!(done.load(Ordering::SeqCst), 1);
        // After finish, nothing new starts.
        assert_eq!(detached.run(async { 1 }).await, Err(Stopping));
    }

    #[tokio::test]
    async fn detached_work_is_bounded_in_number() {
        let detached = Detached::new(2);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut callers = Vec::new();
        for _ in 0..3 {
            let detached = detached.clone();
            let mut rx = rx.clone();
            callers.push(tokio::spawn(async move {
                detached
                    .run(async move {
                        let _ = rx.wait_for(|go| *go).await;
                    })
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(detached.inner.running.load(Ordering::SeqCst), 2);
        tx.send(true).unwrap();
        for caller in callers {
            assert!(caller.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_signal_is_aborted_after_the_bound() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("stuck", |_| std::future::pending::<()>());
        let started = std::time::Instant::now();
        supervisor.stop(Duration::from_millis(100)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
