//! Step 2 of the read path: the shared tier, with a lease.
//!
//! A lookup either finds the value, or makes this caller the key's one loader cluster-wide
//! (it holds the lease: it loads and fills), or finds another loader at work: then the caller
//! polls for that loader's value with backoff, for at most `lease_wait`, and loads itself
//! (caching nothing) if it does not come. A lease is honoured only while nothing invalidated
//! the key: an invalidation deletes the lease, and the holder's fill is refused (no stale set).
//!
//! **Speculative loads.** A batched read (`get_or_load_body_batched`) of a namespace whose
//! recent lookups mostly missed loads *while* it looks up, instead of after: a miss then waits
//! for the longer of the two round trips, not their sum. The load may have read its row
//! before the lease was granted, so the lease alone does not make its fill safe: a write
//! committed between the read and the grant, whose invalidation also came before the grant,
//! would leave the old row cached. The fill is therefore taken only under a *clean* lease
//! (the lookup found no tombstone of an invalidation of the key, its tags or its namespace
//! within `TOMB`, `redis_tier.rs`) and only if the load began less than the speculation
//! window (under `TOMB` and half of `REDIS_TIMEOUT`) before the lookup's answer: then any
//! invalidation between the read and the grant left a tombstone the lookup saw. Otherwise the
//! lease holder loads again, after the grant, as any lease holder does. An instance loads a
//! key speculatively once at a time (its flight lock; a second reader takes the lease path),
//! and a lookup that finds a value answers with it and the load is wasted, which is why only
//! namespaces that mostly miss speculate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::Source;
use super::codec::{decode, due_for_refresh};
use super::load_batch::{FillOutcome, Installer, KeyLoader, LeaseFill};
use super::read::{Answer, Fill, ReadCtx};
use super::redis_tier::Lookup;
use super::stats::add;
use super::tier::SharedTier;

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
        if L::BATCHED
            && self.cache.inner.options.speculative_loads
            && self.counters.mostly_missing()
            && self.cache.inner.may_speculate()
            && let Some(window) = shared.speculation_window()
            && let Ok(_speculating) = self.flight.try_lock()
            && let Some(again) = loader.again()
        {
            return read.speculate(loader, again, window).await;
        }
        // Lives until the read returns: a poller that queued on the flight lock keeps it
        // through its own load, if it ends up loading.
        let mut backoff = Backoff::new(self.cache.inner.options.lease_wait);
        loop {
            match read.lookup().await {
                Step::Served(value) => return Ok((value, Source::Shared)),
                Step::Load { asked, .. } => return read.load_and_fill(loader, asked).await,
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
    /// that granted it was sent. `clean`: no invalidation's tombstone was found with it (a
    /// speculative load may fill under it, see the module's doc).
    Load { asked: Instant, clean: bool },
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
    /// then costs Redis a `GET`, not a script). A batched read's script is shared with the
    /// lookups of concurrent batched reads (`lookup_batch.rs`).
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
            Ok(Lookup::Lease { clean }) => {
                read.cache.inner.shared_ok();
                read.counters.lean(true);
                // The lease holder never waits for the local lock: a waiter of this instance
                // may hold it while polling for the value we are about to load.
                add(&read.counters.misses, 1);
                Step::Load { asked, clean }
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
            return Step::Load {
                asked,
                clean: false,
            };
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
                self.release().await;
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

    /// Nothing will fill the key: the lease goes now, so that a waiter loads at once instead
    /// of polling until the lease's TTL. Best effort: a failed release leaves the lease to
    /// expire.
    async fn release(&self) {
        let read = self.read;
        if let Err(failed) = self.shared.release(&read.full, &self.token).await {
            tracing::debug!(key = read.full, error = %failed, "lease not released");
        }
    }

    /// A speculative load (see the module's doc): `loader` loads while the lookup runs;
    /// `again` loads after the grant if the speculative value may not fill. `window`: the
    /// longest a load may have begun before the lookup's answer and still fill.
    async fn speculate<E, L: KeyLoader<E>>(
        &self,
        loader: L,
        again: L,
        window: Duration,
    ) -> Result<Answer, E> {
        let read = self.read;
        // Before the load is queued: the row is read after this instant.
        let began = Instant::now();
        let (step, loaded) = tokio::join!(self.lookup(), loader.load(read, None));
        match step {
            // A value (the load is wasted), or it was due for a refresh another caller took.
            Step::Served(value) => Ok((value, Source::Shared)),
            Step::Load { asked, clean } => {
                let loaded = match loaded {
                    Ok(loaded) => loaded,
                    Err(err) => {
                        self.release().await;
                        return Err(err);
                    }
                };
                // The answer came within the window (the join waited for the load too, so
                // this is later than the answer: never too lenient).
                if clean && began.elapsed() < window {
                    add(&read.counters.speculative_fills, 1);
                    let fill = self.lease_fill(asked, true);
                    read.cache
                        .defer_fill(fill, loaded.value.clone(), loaded.delta);
                    return Ok((loaded.value, Source::Loaded));
                }
                // The row may be older than an invalidation before the grant: load again.
                add(&read.counters.speculative_reloads, 1);
                self.load_and_fill(again, asked).await
            }
            // Another loader holds the lease (it fills), or the shared tier failed: the row
            // read here answers, uncached.
            Step::Wait { .. } | Step::GiveUp => {
                let loaded = loaded?;
                add(&read.counters.misses, 1);
                Ok((loaded.value, Source::Loaded))
            }
        }
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
