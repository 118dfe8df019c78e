//! The read path: `get_or_load` in three steps.
//!
//! 1. **Near hit**: the in-process tier answers, before any lock or further allocation.
//! 2. **Shared tier, with a lease** (`lease.rs`): a hit is served; a miss makes one caller
//!    cluster-wide the loader (the lease holder), the others poll for its value with backoff.
//! 3. **Load in process** (memory only, or the breaker keeps the shared tier away): one load
//!    per key in this instance, under its flight lock.
//!
//! Past the near hit, a read carries a [`ReadCtx`]: the key and what installing its value
//! needs. Whatever a read installs is refused if an invalidation of its key, tags or namespace
//! came after the read began (`invalidated_since` in `invalidate.rs`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex as AsyncMutex;

use super::codec::{Stored, decode, due_for_refresh, now_ms};
use super::load_batch::{Alone, Batched, KeyLoader, Loaded};
use super::stats::{NsCounters, add};
use super::{Cache, CacheError, CachedBody, MemEntry, Source, namespace_tag};

thread_local! {
    /// The key of a near lookup, spelled without allocating (`get_or_load_body`).
    static NEAR_KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// What a read answers: the bytes (`None`: not found) and where they came from.
pub(super) type Answer = (Option<Arc<[u8]>>, Source);

impl Cache {
    /// Returns the cached value of `namespace`/`key`, or runs `loader` once (per key, across
    /// instances) and caches what it returns. `Ok(None)` from the loader is cached briefly as
    /// "not found". `tags` are attached to the cached value for [`invalidate_tag`](Self::invalidate_tag).
    /// Every read of a key must pass the same `tags`: in Redis a value is served only while it
    /// is in each of the tag sets its reader names (an evicted set's values are loaded again),
    /// so a reader naming a tag its writers did not would reload the key at every read.
    pub async fn get_or_load<T, E, F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[String],
        loader: F,
    ) -> Result<Option<T>, CacheError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let (bytes, _) = self
            .get_or_load_bytes(namespace, key, tags, || async move {
                match loader().await {
                    Ok(Some(value)) => {
                        Ok(Some(serde_json::to_vec(&value).map_err(CacheError::Codec)?))
                    }
                    Ok(None) => Ok(None),
                    Err(err) => Err(CacheError::Load(err)),
                }
            })
            .await?;
        Ok(match bytes {
            Some(bytes) => Some(serde_json::from_slice(&bytes)?),
            None => None,
        })
    }

    /// [`get_or_load`](Self::get_or_load) on serialised bytes, with where the answer came from.
    pub async fn get_or_load_bytes<E, F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[String],
        loader: F,
    ) -> Result<(Option<Arc<[u8]>>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let (body, source) = self.get_or_load_body(namespace, key, tags, loader).await?;
        Ok((body.map(CachedBody::into_bytes), source))
    }

    /// [`get_or_load_bytes`](Self::get_or_load_bytes) with each value's ETag, computed once
    /// per in-process entry: what an HTTP handler serving cached JSON needs.
    pub async fn get_or_load_body<E, F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[String],
        loader: F,
    ) -> Result<(Option<CachedBody>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        self.read_body(namespace, key, tags, Alone(loader)).await
    }

    /// [`get_or_load_body`](Self::get_or_load_body) whose load joins the concurrent loads of
    /// other keys of `namespace` (`load_batch.rs`): they share one call of `load_many` and
    /// one round trip for their fills. `load_many` is given keys and returns the values found,
    /// each with its key; a key not among them is "not found" (cached briefly, as a `None` of
    /// `get_or_load`). Every caller of a namespace passes the same loader: a batch runs its
    /// first caller's.
    pub async fn get_or_load_body_batched<E, B, Fut>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[String],
        load_many: B,
    ) -> Result<(Option<CachedBody>, Source), E>
    where
        B: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<Vec<(String, Vec<u8>)>, E>>,
    {
        self.read_body(namespace, key, tags, Batched(load_many))
            .await
    }

    /// The read path of both: near hit, shared tier, load here.
    async fn read_body<E, L: KeyLoader<E>>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[String],
        loader: L,
    ) -> Result<(Option<CachedBody>, Source), E> {
        let counters = self.inner.stats.ns(namespace);
        let early = self.inner.config.early_refresh.contains(namespace);
        // 1. An in-process hit returns before anything below: no lock, no allocation (the key
        //    is spelled in a buffer this thread reuses).
        let near = NEAR_KEY.with_borrow_mut(|full| {
            full.clear();
            full.push_str(self.inner.config.key_name(namespace));
            full.push(':');
            full.push_str(key);
            self.memory_peek(full, &counters)
        });
        if let Some(entry) = &near
            && !(early && due_for_refresh(entry.expires_at_ms, entry.delta_ms))
        {
            count_near(&counters, entry);
            let body =
                (entry.bytes.clone()).map(|bytes| CachedBody::new(bytes, entry.etag.clone()));
            return Ok((body, Source::Memory));
        }
        // Past the near hit, in a future of its own: boxed, it does not make every hit's
        // future (and the handler's around it) as large as the whole miss path.
        let (bytes, source) = Box::pin(async move {
            let full = self.full_key(namespace, key);
            let read = ReadCtx::new(self, full, key, namespace, tags, counters, early);
            // 2. The shared tier, when there is one and it may be used now.
            if let Some(shared) = self.shared_tier().await {
                read.through_shared(shared, loader).await
            } else {
                // 3. Memory only, or the shared tier is kept away: load here.
                read.load_in_process(near, loader).await
            }
        })
        .await?;
        // Not served from an in-process entry: its ETag, if asked for, is computed for this
        // answer (the next request of this instance is a near hit and shares the entry's).
        Ok((bytes.map(|b| CachedBody::new(b, Arc::default())), source))
    }

    /// Reads a cached value without loading.
    pub async fn get<T: DeserializeOwned>(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<T>, serde_json::Error> {
        let full = self.full_key(namespace, key);
        let counters = self.inner.stats.ns(namespace);
        if let Some(hit) = self.memory_get(&full, &counters) {
            return hit.bytes.map(|b| serde_json::from_slice(&b)).transpose();
        }
        if let Some(shared) = self.shared_tier().await {
            match shared.get(&full, &[namespace_tag(namespace)]).await {
                Ok(Some(stored)) => {
                    if let Some(Stored {
                        value: Some(bytes), ..
                    }) = decode(&stored)
                    {
                        add(&counters.shared_hits, 1);
                        return serde_json::from_slice(bytes).map(Some);
                    }
                }
                Ok(None) => {}
                Err(err) => self.shared_failed(&counters, &err),
            }
        }
        add(&counters.misses, 1);
        Ok(None)
    }

    /// The in-process entry of `full`, of the namespace whose counters are `counters`, not
    /// counted yet: [`count_near`] once it is served (an entry due for early refresh may not
    /// be). `None` while the bus is not trusted (the entry may have missed an invalidation),
    /// and for an entry installed before the namespace's last invalidation (the next install
    /// of the key replaces it; until then it waits for eviction or expiry).
    pub(super) fn memory_peek(&self, full: &str, counters: &NsCounters) -> Option<MemEntry> {
        if self.inner.bus.as_ref().is_some_and(|bus| !bus.trusted()) {
            return None;
        }
        let entry = self.inner.front.get(self.inner.memory.as_ref()?, full)?;
        (entry.generation == counters.generation.load(Ordering::SeqCst)).then_some(entry)
    }

    /// [`memory_peek`](Cache::memory_peek), counted as a near hit: for a caller that serves
    /// whatever it finds.
    pub(super) fn memory_get(&self, full: &str, counters: &NsCounters) -> Option<MemEntry> {
        let entry = self.memory_peek(full, counters)?;
        count_near(counters, &entry);
        Some(entry)
    }

    /// The flight lock of `full`: one load per key inside this instance.
    fn flight(&self, full: &str) -> Arc<AsyncMutex<()>> {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Drop locks nobody holds any more, so the map does not grow without bound.
        if flights.len() > 1024 {
            flights.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        flights.entry(full.to_string()).or_default().clone()
    }
}

/// Counts `entry`, served from the in-process tier, as a near hit (and a negative one).
pub(super) fn count_near(counters: &NsCounters, entry: &MemEntry) {
    add(&counters.near_hits, 1);
    if entry.bytes.is_none() {
        add(&counters.negative_hits, 1);
    }
}

/// One read past the near hit: the key and everything installing its value needs. Built
/// only once the in-process tier could not answer, so a near hit pays for none of it.
pub(super) struct ReadCtx<'a> {
    pub(super) cache: &'a Cache,
    /// The key as every tier and the bus name it (see [`Cache::full_key`]).
    pub(super) full: String,
    /// The key as the caller named it (what a batched loader is given).
    pub(super) key: &'a str,
    pub(super) namespace: &'a str,
    /// The caller's tags: with the key and namespace, what an invalidation may name.
    pub(super) tags: &'a [String],
    /// `tags` plus `ns:<namespace>`: what the stored value carries.
    pub(super) all_tags: Vec<String>,
    /// The namespace's TTL.
    pub(super) ttl: Duration,
    pub(super) counters: Arc<NsCounters>,
    /// The namespace refreshes hot keys early (XFetch).
    pub(super) early: bool,
    /// This key's flight lock in this instance.
    pub(super) flight: Arc<AsyncMutex<()>>,
}

/// A value about to enter the in-process tier.
pub(super) struct Fill {
    value: Option<Arc<[u8]>>,
    /// The time the value has left.
    ttl: Duration,
    /// Wall-clock expiry and load time, for early refresh.
    expires_at_ms: u64,
    delta_ms: u32,
}

impl Fill {
    /// A value loaded just now, in `delta`, to live `ttl`.
    pub(super) fn fresh(value: Option<Arc<[u8]>>, ttl: Duration, delta: Duration) -> Fill {
        Fill {
            value,
            ttl,
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
            delta_ms: delta.as_millis() as u32,
        }
    }

    /// A value read from the shared tier: it lives what its stored entry has left.
    pub(super) fn stored(value: Option<Arc<[u8]>>, entry: &Stored<'_>) -> Fill {
        Fill {
            value,
            ttl: entry.remaining(),
            expires_at_ms: entry.expires_at_ms(),
            delta_ms: entry.delta_ms,
        }
    }
}

/// Whose value an install is: the key and what an invalidation of it may name.
pub(super) struct InstallKey<'a> {
    pub full: &'a str,
    pub namespace: &'a str,
    /// The caller's tags.
    pub tags: &'a [String],
    /// The namespace's counters: its generation.
    pub counters: &'a NsCounters,
}

impl Cache {
    /// Puts a value into the in-process tier, unless the bus is not trusted right now or an
    /// invalidation of `key` came after `started_epoch` (when its read began).
    pub(super) fn install(&self, key: &InstallKey<'_>, started_epoch: u64, fill: Fill) {
        let inner = &self.inner;
        let Some(memory) = &inner.memory else {
            return;
        };
        let overtaken = || self.invalidated_since(started_epoch, key.full, key.namespace, key.tags);
        // Read before the checks: an invalidation of the namespace marks it, then moves its
        // generation on. Either this read comes after that move (and the check below sees
        // the mark, if the invalidation came after the read began), or the entry carries the
        // generation the invalidation left behind and is never served.
        let generation = key.counters.generation.load(Ordering::SeqCst);
        if fill.ttl.is_zero() || inner.bus.as_ref().is_some_and(|bus| !bus.trusted()) || overtaken()
        {
            return;
        }
        let entry = MemEntry {
            bytes: fill.value,
            etag: Arc::default(),
            generation,
            ttl: fill.ttl,
            expires_at_ms: fill.expires_at_ms,
            delta_ms: fill.delta_ms,
        };
        inner
            .tag_index
            .insert(memory, key.full.to_string(), entry, key.tags);
        // Check again after the insert: an invalidation bumps the epoch *before* it removes,
        // so either its removal comes after our insert, or this check sees its bump.
        if overtaken() {
            memory.invalidate(key.full);
        }
        // This key alone changed: the other keys' copies in the threads' fronts stay.
        inner.front.put(key.full);
    }
}

impl<'a> ReadCtx<'a> {
    fn new(
        cache: &'a Cache,
        full: String,
        key: &'a str,
        namespace: &'a str,
        tags: &'a [String],
        counters: Arc<NsCounters>,
        early: bool,
    ) -> Self {
        let flight = cache.flight(&full);
        let mut all_tags: Vec<String> = tags.to_vec();
        all_tags.push(namespace_tag(namespace));
        ReadCtx {
            cache,
            full,
            key,
            namespace,
            tags,
            all_tags,
            ttl: cache.ttl(namespace),
            counters,
            early,
            flight,
        }
    }

    /// Step 3: no shared tier to ask. One load per key in this instance; the near entry (if
    /// any) was due for early refresh.
    async fn load_in_process<E, L: KeyLoader<E>>(
        &self,
        near: Option<MemEntry>,
        loader: L,
    ) -> Result<Answer, E> {
        // A near entry due for early refresh. With a shared tier (kept away by its breaker
        // now), refreshes go through its lease once it is back; memory only, one caller
        // refreshes, the others keep the current value.
        if let Some(entry) = near
            && self.cache.inner.shared.is_none()
        {
            let Ok(_guard) = self.flight.try_lock() else {
                count_near(&self.counters, &entry);
                return Ok((entry.bytes, Source::Memory));
            };
            add(&self.counters.early_refreshes, 1);
            return self.load_into_memory(loader).await;
        }
        let _guard = self.flight.lock().await;
        // Another task of this instance may have filled it while we waited.
        if let Some(entry) = self.cache.memory_get(&self.full, &self.counters) {
            return Ok((entry.bytes, Source::Memory));
        }
        add(&self.counters.misses, 1);
        self.load_into_memory(loader).await
    }

    /// Memory only: loads, and keeps the value in the in-process tier unless an invalidation
    /// overtook the load.
    async fn load_into_memory<E, L: KeyLoader<E>>(&self, loader: L) -> Result<Answer, E> {
        let started_epoch = self.cache.inner.epoch.load(Ordering::SeqCst);
        let Loaded { value, delta, .. } = loader.load(self, None).await?;
        self.install_loaded(started_epoch, value.clone(), delta);
        Ok((value, Source::Loaded))
    }

    /// Memory-only mode: install what this instance just loaded.
    fn install_loaded(&self, started_epoch: u64, value: Option<Arc<[u8]>>, delta: Duration) {
        if self.cache.inner.shared.is_some() {
            return;
        }
        let ttl = self.value_ttl(value.is_some());
        let fill = Fill::fresh(value, ttl, delta);
        if self.invalidated_since(started_epoch) {
            add(&self.counters.stale_sets_refused, 1);
            return;
        }
        self.install(started_epoch, fill);
    }

    /// Puts a value into the in-process tier, unless the bus is not trusted right now or an
    /// invalidation overtook the read.
    pub(super) fn install(&self, started_epoch: u64, fill: Fill) {
        let key = InstallKey {
            full: &self.full,
            namespace: self.namespace,
            tags: self.tags,
            counters: &self.counters,
        };
        self.cache.install(&key, started_epoch, fill);
    }

    fn invalidated_since(&self, epoch: u64) -> bool {
        self.cache
            .invalidated_since(epoch, &self.full, self.namespace, self.tags)
    }

    /// The TTL of a value (`found`) or of a cached not-found: the namespace's TTL, capped
    /// by `negative_ttl` for a not-found.
    pub(super) fn value_ttl(&self, found: bool) -> Duration {
        if found {
            self.ttl
        } else {
            self.ttl.min(self.cache.inner.options.negative_ttl)
        }
    }

    /// Runs the loader, counting it and its time; returns how long it took (for XFetch).
    pub(super) async fn timed_load<E, F, Fut>(
        &self,
        loader: F,
    ) -> Result<(Option<Vec<u8>>, Duration), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let started = Instant::now();
        let result = loader().await;
        let elapsed = started.elapsed();
        self.count_loads(1, elapsed);
        result.map(|loaded| (loaded, elapsed))
    }
}
