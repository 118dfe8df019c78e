//! Step 2 of the read path: the shared tier, with a lease.
//!
//! A lookup either finds the value, or makes this caller the key's one loader cluster-wide
//! (it holds the lease: it loads and fills), or finds another loader at work: then the caller
//! polls for that loader's value with backoff, for at most `lease_wait`, and loads itself
//! (caching nothing) if it does not come. A lease is honoured only while nothing invalidated
//! the key: an invalidation deletes the lease, and the holder's fill is refused (no stale set).
//!
//! **Speculative loads.** A batched read (`get_or_load_body_batched`) of a namespace whose
//! recent lookups all missed (on balance, the last 16) loads at once, without a lookup, and
//! is answered with the row it read: a miss waits for its load alone, not for a lookup and
//! then a load. The row is then stored in Redis with a script of its own (`STORE_FRESH_MANY`,
//! `redis_tier.rs`; the stores of concurrent speculative loads share one, `load_batch.rs`),
//! and kept in process once stored. It holds no lease, so the lease cannot refuse a stale
//! set; tombstones and a deadline do. Every invalidation leaves tombstones of its keys, tags
//! and namespaces for `TOMB` (1 s); the store is taken only if it finds none of the key's, and
//! only if it runs within the speculation window (at most half of `TOMB` and of
//! `REDIS_TIMEOUT`) of the load's start, by Redis's clock (a lower bound of its offset from
//! ours is sampled from the scripts' replies, `RedisClock`). A write committed after the row
//! was read was invalidated after the load began, hence less than `TOMB` before the store: its
//! tombstone refuses the store. (The answer itself is as fresh as any read of the source
//! begun with the request.) An instance loads a key speculatively once at a time: the key's
//! flight lock is held until the store is answered, and its other batched reads wait for it
//! rather than lease and load again; a store taken was installed in process by then, where
//! they find it without a lookup. A value already in Redis makes the load a waste (it is
//! then kept in process), which is why only namespaces whose lookups all miss lately
//! speculate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::codec::{decode, due_for_refresh};
use super::load_batch::{FillOutcome, Installer, KeyLoader, LeaseFill};
use super::read::{Answer, Fill, ReadCtx, count_near};
use super::redis_tier::{Lookup, TOMB};
use super::stats::add;
use super::tier::SharedTier;
use super::{Cache, Source};

/// First pause between two polls for another loader's value; it doubles up to
/// [`MAX_POLL_DELAY`], and polling stops after `EngineOptions::lease_wait` in all.
const FIRST_POLL_DELAY: Duration = Duration::from_millis(2);
const MAX_POLL_DELAY: Duration = Duration::from_millis(25);

impl ReadCtx<'_> {
    /// Step 2: a read through the shared tier. Hits take no lock. The lease makes one loader
    /// cluster-wide; the local flight lock only keeps this instance's waiters from polling
    /// the shared tier all at once. The lease holder never takes it (a poller holding it
    /// waits for that holder).
    pub(super) async fn through_shared<E, L: KeyLoader<E>>(
        &self,
        shared: &SharedTier,
        loader: L,
    ) -> Result<Answer, E> {
        let read = SharedRead::begin(self, shared, L::BATCHED);
        let speculative = L::BATCHED
            && self.cache.inner.options.speculative_loads
            && self.cache.inner.config.speculative_loads;
        if speculative
            && self.counters.missing_steadily()
            && self.cache.inner.may_speculate()
            && self.cache.inner.settling.load(Ordering::Relaxed) < MAX_SETTLING
            && let Some(window) =
                shared.speculation_window(self.cache.inner.options.speculation_window)
            // Known here to have been invalidated lately (a write, then its read): the store
            // would find the tombstone and nothing could fill.
            && !self.cache.invalidated_within(TOMB, &self.full, self.namespace, &self.all_tags)
            && let Ok(flight) = self.flight.clone().try_lock_owned()
        {
            return read.speculate(loader, window, flight).await;
        }
        // Lives until the read returns: a poller that queued on the flight lock keeps it
        // through its own load, if it ends up loading.
        let mut backoff = Backoff::new(self.cache.inner.options.lease_wait);
        if speculative && self.flight.try_lock().is_err() {
            // Another read of this instance holds the key, maybe a speculative load: it takes
            // no lease, so a lookup now would lease the key and load it again. Its flight lock
            // is held until its store is answered, after which the lookup finds the value.
            // Waited for out of this read's `lease_wait`, like any poll.
            let _ = tokio::time::timeout(backoff.left(), self.flight.lock()).await;
            // A store taken was installed in process before the lock was let go: served from
            // there, without the round trip of a lookup (unless it is due for early refresh,
            // as at the read's first look).
            if let Some(entry) = self.cache.memory_peek(&self.full, &self.counters)
                && !(self.early && due_for_refresh(entry.expires_at_ms, entry.delta_ms))
            {
                count_near(&self.counters, &entry);
                return Ok((entry.bytes, Source::Memory));
            }
        }
        loop {
            match read.lookup().await {
                Step::Served(value) => return Ok((value, Source::Shared)),
                Step::Load { asked } => return read.load_and_fill(loader, asked).await,
                Step::Wait { queue } => {
                    add(&self.counters.lease_waits, 1);
                    if !backoff.wait(&self.flight, queue).await {
                        break;
                    }
                }
                Step::GiveUp => break,
            }
        }
        // The shared tier failed or the other loader took too long: load, cache nothing.
        add(&self.counters.misses, 1);
        let loaded = loader.load(self, None).await?;
        Ok((loaded.value, Source::Loaded))
    }
}

/// What one shared-tier lookup tells the reader to do next.
enum Step {
    /// The shared tier answered.
    Served(Option<Arc<[u8]>>),
    /// This caller holds the lease: load and fill the shared tier. `asked`: when the call
    /// that granted it was sent.
    Load { asked: Instant },
    /// Another caller is loading (or revalidating) the key: poll again. `queue`: before the
    /// first poll, wait for this instance's flight lock (one poller per key per instance).
    Wait { queue: bool },
    /// The shared tier failed or its entry is unreadable: load without caching.
    GiveUp,
}

/// A read through the shared tier, from its first lookup on.
struct SharedRead<'a> {
    read: &'a ReadCtx<'a>,
    shared: &'a SharedTier,
    /// The invalidation epoch before the first lookup: what this read serves or loads is
    /// installed in process only if nothing it depends on was invalidated since.
    started_epoch: u64,
    /// Names this caller's lease, if it gets one: the shared tier takes its fill only while
    /// the lease is still this token (an invalidation deletes it: no stale set).
    token: String,
    lease_ttl: Duration,
    /// A batched read: its lookups share scripts with the concurrent ones (`lookup_batch.rs`).
    batched: bool,
}

impl<'a> SharedRead<'a> {
    fn begin(read: &'a ReadCtx<'a>, shared: &'a SharedTier, batched: bool) -> Self {
        SharedRead {
            read,
            shared,
            started_epoch: read.cache.inner.epoch.load(Ordering::SeqCst),
            token: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            lease_ttl: read.cache.inner.options.lease_ttl,
            batched,
        }
    }

    /// One round trip to the shared tier when the namespace's recent lookups mostly missed
    /// (the lookup script reads or leases); a plain read first while they mostly hit (a hit
    /// then costs Redis a `GET` and a `ZSCORE` per tag set, not a script). A batched read's
    /// script is shared with the lookups of concurrent batched reads (`lookup_batch.rs`).
    async fn lookup(&self) -> Step {
        let read = self.read;
        let asked = Instant::now();
        let found = self
            .shared
            .lookup(
                &read.full,
                &read.all_tags,
                &self.token,
                self.lease_ttl,
                read.ttl,
                !read.counters.mostly_missing(),
                self.batched,
            )
            .await;
        match found {
            Ok(Lookup::Hit(stored)) => {
                read.cache.inner.shared_ok();
                read.counters.lean(false);
                self.on_hit(&stored).await
            }
            Ok(Lookup::Lease) => {
                read.cache.inner.shared_ok();
                read.counters.lean(true);
                // The lease holder never waits for the local lock: a waiter of this instance
                // may hold it while polling for the value we are about to load.
                add(&read.counters.misses, 1);
                Step::Load { asked }
            }
            Ok(Lookup::Wait) => Step::Wait { queue: true },
            Err(err) => {
                read.cache.shared_failed(&read.counters, &err);
                Step::GiveUp
            }
        }
    }

    async fn on_hit(&self, stored: &[u8]) -> Step {
        let read = self.read;
        let Some(entry) = decode(stored) else {
            tracing::warn!(key = read.full, "undecodable cache entry; loading");
            return Step::GiveUp;
        };
        // Stored before an outage ended: another instance may have failed to delete it
        // meanwhile, so it is revalidated before anyone is served it. Early refresh: one
        // caller reloads a hot key before it expires.
        let distrust_before = read.cache.inner.distrust_before_ms.load(Ordering::SeqCst);
        let suspect = entry.stored_at_ms < distrust_before;
        let refresh =
            suspect || (read.early && due_for_refresh(entry.expires_at_ms(), entry.delta_ms));
        let asked = Instant::now();
        if refresh && self.try_lease().await {
            let counter = if suspect {
                &read.counters.misses
            } else {
                &read.counters.early_refreshes
            };
            add(counter, 1);
            return Step::Load { asked };
        }
        if suspect {
            // Another caller is revalidating it: wait for its value.
            return Step::Wait { queue: false };
        }
        add(&read.counters.shared_hits, 1);
        if entry.value.is_none() {
            add(&read.counters.negative_hits, 1);
        }
        let value: Option<Arc<[u8]>> = entry.value.map(Arc::from);
        read.install(self.started_epoch, Fill::stored(value.clone(), &entry));
        Step::Served(value)
    }

    /// Takes the lease on a key that has a value (to refresh it); false if another caller
    /// holds it or the shared tier failed.
    async fn try_lease(&self) -> bool {
        let read = self.read;
        let leased = self
            .shared
            .try_lease(
                &read.full,
                &read.all_tags,
                &self.token,
                self.lease_ttl,
                read.ttl,
            )
            .await;
        matches!(leased, Ok(true))
    }

    /// The lease holder's work: load, fill the shared tier if the lease still holds, and keep
    /// a copy in the in-process tier. The shared tier counts the value's TTL from the lease's
    /// grant (when its tag entries end); the stored header and the copy here count it from
    /// `asked`, just before, so neither outlives the shared value.
    /// A batched loader fills in its batch's round (`load_batch.rs`); either way the fill is
    /// conditional on this read's token.
    async fn load_and_fill<E, L: KeyLoader<E>>(
        &self,
        loader: L,
        asked: Instant,
    ) -> Result<Answer, E> {
        let read = self.read;
        let fill = self.lease_fill(asked, L::BATCHED);
        let loaded = match loader.load(read, Some(fill)).await {
            Ok(loaded) => loaded,
            Err(err) => {
                // Nothing will fill the key: the lease goes now, so that a waiter loads at
                // once instead of polling until the lease's TTL. Best effort: a failed
                // release leaves the lease to expire, as before.
                if let Err(failed) = self.shared.release(&read.full, &self.token).await {
                    tracing::debug!(key = read.full, error = %failed, "lease not released");
                }
                return Err(err);
            }
        };
        match loaded.fill {
            FillOutcome::Stored => read.install(
                self.started_epoch,
                Fill::fresh(loaded.value.clone(), loaded.left, loaded.delta),
            ),
            FillOutcome::Refused => add(&read.counters.stale_sets_refused, 1),
            // Counted against the breaker where it failed; nothing to fill without a lease;
            // a batch's fill task installs (or counts) its values itself.
            FillOutcome::Failed | FillOutcome::NotAsked | FillOutcome::Deferred => {}
        }
        Ok((loaded.value, Source::Loaded))
    }
}

impl SharedRead<'_> {
    /// What this read's lease holder fills with. `install`: the value is installed in process
    /// by a fill task once its fill is taken (a batch's or a speculative load's).
    fn lease_fill(&self, asked: Instant, install: bool) -> LeaseFill {
        let read = self.read;
        LeaseFill {
            full: read.full.clone(),
            tags: read.all_tags.clone(),
            token: self.token.clone(),
            lease_ttl: self.lease_ttl,
            ttl_found: read.value_ttl(true),
            ttl_missing: read.value_ttl(false),
            asked,
            install: install.then(|| {
                Arc::new(Installer {
                    namespace: read.namespace.to_string(),
                    tags: read.tags.to_vec(),
                    started_epoch: self.started_epoch,
                    counters: read.counters.clone(),
                })
            }),
        }
    }

    /// A speculative load (see the module's doc): the caller loads at once and is answered
    /// with its row; the row is then stored in Redis with the other deferred stores
    /// (`load_batch.rs`), if it can still run within `window` of the load's start, and kept in
    /// process once stored. `flight`: this key's flight lock, held until then, so that the
    /// instance's other reads of the key wait for that store rather than load it again.
    async fn speculate<E, L: KeyLoader<E>>(
        &self,
        loader: L,
        window: Duration,
        flight: OwnedMutexGuard<()>,
    ) -> Result<Answer, E> {
        let read = self.read;
        // Before the load is queued: the row is read after this instant, the value's TTL and
        // the store's deadline count from it.
        let fill = self.lease_fill(Instant::now(), true);
        let settling = Settling::new(read.cache);
        add(&read.counters.misses, 1);
        // An error (or this future dropped) drops the guards: nothing is stored.
        let loaded = match loader.load(read, None).await {
            Ok(loaded) => loaded,
            Err(err) => {
                add(&read.counters.speculative_unfilled, 1);
                return Err(err);
            }
        };
        read.cache.defer_fresh(
            fill,
            window,
            loaded.value.clone(),
            loaded.delta,
            (flight, settling),
        );
        Ok((loaded.value, Source::Loaded))
    }
}

/// Most speculative stores of one instance not yet answered: past it, reads load after their
/// lease (their callers wait for Redis again). Callers answered without waiting for Redis
/// would otherwise queue stores faster than Redis takes them.
const MAX_SETTLING: usize = 128;

/// A speculative load's store not answered yet, counted against [`MAX_SETTLING`] until
/// dropped.
pub(super) struct Settling(Cache);

impl Settling {
    fn new(cache: &Cache) -> Self {
        cache.inner.settling.fetch_add(1, Ordering::Relaxed);
        Settling(cache.clone())
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.0.inner.settling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polling for another loader's value: pauses of [`FIRST_POLL_DELAY`] doubling to
/// [`MAX_POLL_DELAY`], for at most `lease_wait` in all, after which the caller loads itself.
struct Backoff {
    until: Instant,
    delay: Duration,
    /// This key's flight lock, once this caller queued on it: the other callers of this
    /// instance queue behind it and find the value when their turn comes.
    queued: Option<OwnedMutexGuard<()>>,
}

impl Backoff {
    fn new(lease_wait: Duration) -> Self {
        Backoff {
            until: Instant::now() + lease_wait,
            delay: FIRST_POLL_DELAY,
            queued: None,
        }
    }

    /// What is left of `lease_wait`.
    fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }

    /// Waits before the next poll; false once `lease_wait` is spent. With `queue`, the first
    /// wait is for `flight` instead of a pause.
    async fn wait(&mut self, flight: &Arc<AsyncMutex<()>>, queue: bool) -> bool {
        if Instant::now() >= self.until {
            return false;
        }
        if queue && self.queued.is_none() {
            self.queued = Some(flight.clone().lock_owned().await);
            return true;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_POLL_DELAY);
        true
    }
}
