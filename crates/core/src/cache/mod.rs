//! The cache engine: namespaces with TTLs, `get_or_load` with single-flight and leases, tags,
//! negative caching, and a Redis tier behind a circuit breaker.
//!
//! Tiers. With Redis configured, the shared tier is Redis: one loader per key cluster-wide
//! (a lease), no stale set after an invalidation (the fill is refused once the lease is gone).
//! Without Redis, an in-process tier bounded by bytes serves a single instance.
//!
//! Values are serialised once, as JSON: they are mostly API payloads, so the cached bytes can
//! be sent as a response body as they are, and stay readable with `redis-cli`.
//!
//! Redis failure: every call has the `REDIS_TIMEOUT` deadline; failures trip a breaker and
//! reads go straight to the loader (PostgreSQL) with no error to the caller. Invalidations that
//! cannot reach Redis are remembered and replayed before Redis is read again, so a Redis that
//! was only paused (SIGSTOP, keeping its old data) never serves a value invalidated meanwhile.

mod breaker;
mod bus;
mod marks;
mod pg_tier;
mod redis_tier;
mod stats;
mod tag_index;
mod tier;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache as Moka;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use breaker::BreakerState;
pub use stats::NamespaceStats;

use self::breaker::{Breaker, Permit};
use self::bus::Bus;
use self::marks::Marks;
use self::pg_tier::PgTier;
use self::redis_tier::{Lookup, RedisTier};
use self::stats::{NsCounters, Stats, add};
use self::tag_index::TagIndex;
use self::tier::{SharedTier, TierError};
use crate::config::CacheConfig;
use crate::db::Db;
use crate::redis::Redis;
use crate::shutdown::ShutdownSignal;

/// Which shared tier the engine uses.
#[derive(Clone)]
pub enum Backend {
    /// In-process only: one instance, no Redis.
    Memory,
    /// Redis, shared by every instance.
    Redis(Redis),
    /// PostgreSQL UNLOGGED tables (`CACHE_BACKEND=postgres`), shared by every instance.
    Postgres(Db),
}

/// Engine settings beyond [`CacheConfig`]; defaults suit most deployments.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How long a cached "not found" lives (capped by the namespace TTL).
    pub negative_ttl: Duration,
    /// How long a loader's lease lasts: a crashed loader blocks others at most this long.
    pub lease_ttl: Duration,
    /// How long a caller waits for another instance's loader before loading itself (uncached).
    pub lease_wait: Duration,
    /// Size bound of the in-process tier, bytes; 0 turns the tier off.
    pub memory_bytes: u64,
    /// Consecutive Redis failures that open the breaker, and how long it stays open.
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            negative_ttl: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            lease_wait: Duration::from_secs(2),
            memory_bytes: 64 * 1024 * 1024,
            breaker_threshold: 3,
            breaker_cool_down: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError<E> {
    /// The loader failed; nothing was cached.
    #[error(transparent)]
    Load(E),
    #[error("cached value could not be encoded or decoded: {0}")]
    Codec(#[from] serde_json::Error),
}

/// The key a load is for, with what installing its value needs.
struct Target<'a> {
    full: &'a str,
    namespace: &'a str,
    tags: &'a [String],
    all_tags: &'a [String],
    ttl: Duration,
}

/// One in-process entry. `bytes == None` is a cached "not found".
#[derive(Clone)]
struct MemEntry {
    bytes: Option<Arc<[u8]>>,
    tags: Arc<[String]>,
    ttl: Duration,
    /// Wall-clock expiry and load time, for early refresh.
    expires_at_ms: u64,
    delta_ms: u32,
}

struct MemExpiry;

impl moka::Expiry<String, MemEntry> for MemExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &MemEntry,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    /// A replaced value (a refresh, a set) lives its own TTL, not what was left of the old one.
    fn expire_after_update(
        &self,
        _key: &String,
        value: &MemEntry,
        _now: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// One invalidation to deliver to Redis.
enum Invalidation {
    Keys(Vec<String>),
    Tags(Vec<String>),
}

impl Invalidation {
    fn record(&self, pending: &mut Pending) {
        match self {
            Invalidation::Keys(keys) => pending.keys.extend(keys.iter().cloned()),
            Invalidation::Tags(tags) => pending.tags.extend(tags.iter().cloned()),
        }
    }
}

/// Invalidations not yet delivered to Redis.
#[derive(Default)]
struct Pending {
    keys: HashSet<String>,
    tags: HashSet<String>,
}

/// A cheap-to-clone handle on the engine.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: CacheConfig,
    /// Keeps the in-process tiers of all instances coherent (Redis backend only).
    bus: Option<Bus>,
    options: EngineOptions,
    memory: Option<Moka<String, MemEntry>>,
    /// Which in-process keys carry each tag (`tag_index.rs`).
    tag_index: TagIndex,
    shared: Option<SharedTier>,
    breaker: Breaker,
    /// Per-key locks: one load per key inside this instance.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped by every invalidation; a load remembers the value at its start.
    epoch: AtomicU64,
    /// Epoch of the latest invalidation of each key (`k:`), tag (`t:`) or namespace (`n:`),
    /// kept longer than any load lasts, so a finishing load can tell it was overtaken.
    invalidated: Marks,
    pending: Mutex<Pending>,
    /// A shared-tier call failed since the last success.
    outage: AtomicBool,
    /// Wall-clock ms: shared entries stored before this are revalidated (see `shared_ok`).
    distrust_before_ms: AtomicU64,
    /// Serialises replays of `pending` so one caller does it.
    replay: tokio::sync::Mutex<()>,
    stats: Stats,
}

/// The seeds' key names (seed 003's D022HR keyspace, seed 000's sessions) for the namespaces
/// they name: an entry of namespace `assets` is `cache:asset:<key>` under the configured
/// prefix, as in the seed. Other namespaces use their own name. The namespace stays what
/// carries the TTL and the `ns:<namespace>` tag.
const SEED_KEY_NAMES: &[(&str, &str)] = &[
    ("assets", "cache:asset"),
    ("listings", "cache:listings"),
    ("bundles", "bundle"),
    ("lineage", "ol:cache:lineage"),
    ("sessions", "session"),
];

/// The key of `key` in `namespace`, as every tier and the bus name it (without the prefix).
pub fn full_key(namespace: &str, key: &str) -> String {
    let name = SEED_KEY_NAMES
        .iter()
        .find(|(ns, _)| *ns == namespace)
        .map_or(namespace, |(_, name)| name);
    format!("{name}:{key}")
}

const NEGATIVE: u8 = b'N';
const VALUE: u8 = b'V';
/// kind (1) + stored_at ms (8) + ttl ms (4) + load time ms (4).
const HEADER: usize = 17;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A stored entry: the value (or a cached not-found) with when it was stored, for how long,
/// and how long its load took (for early refresh).
struct Stored<'a> {
    value: Option<&'a [u8]>,
    stored_at_ms: u64,
    ttl_ms: u32,
    delta_ms: u32,
}

impl Stored<'_> {
    fn expires_at_ms(&self) -> u64 {
        self.stored_at_ms + u64::from(self.ttl_ms)
    }

    /// Time left, by this host's clock.
    fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_at_ms().saturating_sub(now_ms()))
    }
}

/// Probabilistic early expiration ("XFetch", Vattani et al., VLDB 2015): refresh when
/// `now - delta·ln(rand) ≥ expiry`, so one caller, rarely early and more likely near the end,
/// reloads a hot key before it expires and nobody sees a miss.
fn due_for_refresh(expires_at_ms: u64, delta_ms: u32) -> bool {
    let gap = -(f64::from(delta_ms.max(1))) * fastrand::f64().max(f64::MIN_POSITIVE).ln();
    now_ms() as f64 + gap >= expires_at_ms as f64
}

fn encode(value: Option<&[u8]>, ttl: Duration, delta: Duration) -> Vec<u8> {
    let payload = value.unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + HEADER);
    out.push(if value.is_some() { VALUE } else { NEGATIVE });
    out.extend_from_slice(&now_ms().to_be_bytes());
    out.extend_from_slice(&(ttl.as_millis().min(u128::from(u32::MAX)) as u32).to_be_bytes());
    out.extend_from_slice(&(delta.as_millis().min(u128::from(u32::MAX)) as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn decode(stored: &[u8]) -> Option<Stored<'_>> {
    if stored.len() < HEADER {
        return None;
    }
    let stored_at_ms = u64::from_be_bytes(stored[1..9].try_into().ok()?);
    let ttl_ms = u32::from_be_bytes(stored[9..13].try_into().ok()?);
    let delta_ms = u32::from_be_bytes(stored[13..17].try_into().ok()?);
    let value = match stored[0] {
        VALUE => Some(&stored[HEADER..]),
        NEGATIVE => None,
        _ => return None,
    };
    Some(Stored {
        value,
        stored_at_ms,
        ttl_ms,
        delta_ms,
    })
}

/// How many times an invalidation is sent to the shared tier before it is only remembered.
const DELIVERY_ATTEMPTS: u32 = 3;

/// Entries stored up to this long after an outage ended are revalidated too: the storing and
/// the reading instance's clocks may differ slightly.
const CLOCK_SLACK_MS: u64 = 1000;

impl Inner {
    /// The shared tier answered. The first answer after an outage starts distrusting entries
    /// stored before now: invalidations other instances could not deliver meanwhile are not
    /// known here (a paused Redis comes back with its old data).
    pub(crate) fn shared_ok(&self) {
        self.breaker.success();
        if self.outage.swap(false, Ordering::SeqCst) {
            self.distrust_before_ms
                .store(now_ms() + CLOCK_SLACK_MS, Ordering::SeqCst);
            tracing::info!(
                "shared cache tier back: entries stored before now are revalidated on read"
            );
        }
    }

    /// The shared tier (or the bus on it) failed.
    pub(crate) fn note_outage(&self) {
        self.outage.store(true, Ordering::SeqCst);
    }

    fn bump(&self, marks: &[String]) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.invalidated.record(marks, epoch);
    }

    /// Drops everything from the in-process tier (the bus was lost and is back).
    pub(crate) fn flush_memory(&self) {
        self.bump(&[]);
        if let Some(memory) = &self.memory {
            self.tag_index.invalidate_all(memory);
        }
    }

    /// Applies an invalidation heard on the bus from another instance.
    pub(crate) fn apply_invalidation(&self, keys: &[String], tags: &[String]) {
        let marks: Vec<String> = keys
            .iter()
            .map(|k| format!("k:{k}"))
            .chain(tags.iter().map(|t| format!("t:{t}")))
            .collect();
        self.bump(&marks);
        if let Some(memory) = &self.memory {
            for key in keys {
                memory.invalidate(key);
            }
            self.tag_index.invalidate(memory, tags);
        }
    }
}

/// Where a `get_or_load` answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory,
    Shared,
    Loaded,
}

impl Cache {
    /// Builds the engine on the given shared tier.
    pub fn new(config: CacheConfig, backend: Backend, options: EngineOptions) -> Cache {
        let bus = match &backend {
            Backend::Redis(redis) => Some(Bus::new(
                bus::Transport::Redis(redis.clone()),
                &config.key_prefix,
            )),
            Backend::Postgres(db) => Some(Bus::new(
                bus::Transport::Postgres(db.clone()),
                &config.key_prefix,
            )),
            Backend::Memory => None,
        };
        let shared = match backend {
            Backend::Memory => None,
            Backend::Redis(redis) => {
                let tier = RedisTier::new(redis, config.key_prefix.clone());
                Some(SharedTier::Redis(Box::new(tier)))
            }
            Backend::Postgres(db) => Some(SharedTier::Postgres(PgTier::new(db))),
        };
        // The in-process tier needs coherence: alone (no shared tier) or with the bus.
        let memory = (options.memory_bytes > 0 && (shared.is_none() || bus.is_some())).then(|| {
            Moka::builder()
                .max_capacity(options.memory_bytes)
                .weigher(|k: &String, v: &MemEntry| {
                    (k.len() + v.bytes.as_ref().map_or(0, |b| b.len()) + 64)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .expire_after(MemExpiry)
                .build()
        });
        let invalidated = Marks::new(options.lease_ttl * 4 + Duration::from_secs(60), 100_000);
        let cache = Cache {
            inner: Arc::new(Inner {
                bus,
                breaker: Breaker::new(options.breaker_threshold, options.breaker_cool_down),
                config,
                options,
                memory,
                tag_index: TagIndex::default(),
                shared,
                flights: Mutex::default(),
                epoch: AtomicU64::new(0),
                invalidated,
                pending: Mutex::default(),
                outage: AtomicBool::new(false),
                distrust_before_ms: AtomicU64::new(0),
                replay: tokio::sync::Mutex::new(()),
                stats: Stats::default(),
            }),
        };
        if cache.inner.bus.is_some() {
            tokio::spawn(bus::run(Arc::downgrade(&cache.inner)));
        }
        cache
    }

    /// The TTL of a namespace.
    pub fn ttl(&self, namespace: &str) -> Duration {
        self.inner.config.ttl(namespace)
    }

    /// Counters of every namespace used so far.
    pub fn stats(&self) -> Vec<NamespaceStats> {
        self.inner.stats.snapshot()
    }

    /// Instances sharing this cache, this one included, as last heard on the bus (1 without
    /// a bus). Stays at its last value while the bus is down.
    pub fn live_instances(&self) -> usize {
        self.inner
            .bus
            .as_ref()
            .map_or(1, |bus| bus.live_instances(Duration::from_secs(2)))
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Returns the cached value of `namespace`/`key`, or runs `loader` once (per key, across
    /// instances) and caches what it returns. `Ok(None)` from the loader is cached briefly as
    /// "not found". `tags` are attached to the cached value for [`invalidate_tag`](Self::invalidate_tag).
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
        let full = full_key(namespace, key);
        let counters = self.inner.stats.ns(namespace);
        let early = self.inner.config.early_refresh.contains(namespace);
        // An in-process hit returns before anything below: no lock, no further allocation.
        let near = self.memory_get(&full, &counters);
        if let Some(entry) = &near
            && !(early && due_for_refresh(entry.expires_at_ms, entry.delta_ms))
        {
            return Ok((entry.bytes.clone(), Source::Memory));
        }
        let flight = self.flight(&full);
        let mut all_tags: Vec<String> = tags.to_vec();
        all_tags.push(format!("ns:{namespace}"));
        let ttl = self.ttl(namespace);

        // A near entry due for early refresh. With a shared tier, the refresh goes through its
        // lease below; memory only, one caller refreshes, the others keep the current value.
        if let Some(entry) = near
            && self.inner.shared.is_none()
        {
            let Ok(_guard) = flight.try_lock() else {
                return Ok((entry.bytes, Source::Memory));
            };
            add(&counters.early_refreshes, 1);
            let target = Target {
                full: &full,
                namespace,
                tags,
                all_tags: &all_tags,
                ttl,
            };
            return self.load_into_memory(target, &counters, loader).await;
        }

        if let Some(shared) = self.shared_tier().await {
            // Hits take no lock. The lease makes one loader cluster-wide; the local flight lock
            // only keeps this instance's waiters from polling the shared tier all at once.
            // The lease holder never takes it (a poller holding it waits for that holder).
            let mut _guard = None;
            let started_epoch = self.inner.epoch.load(Ordering::SeqCst);
            let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            let lease_ttl = self.inner.options.lease_ttl;
            let wait_until = Instant::now() + self.inner.options.lease_wait;
            let mut delay = Duration::from_millis(2);
            loop {
                match shared.lookup(&full, &all_tags, &token, lease_ttl).await {
                    Ok(Lookup::Hit(stored)) => {
                        self.inner.shared_ok();
                        let Some(entry) = decode(&stored) else {
                            tracing::warn!(key = full, "undecodable cache entry; loading");
                            break;
                        };
                        // Stored before an outage ended: another instance may have failed to
                        // delete it meanwhile, so it is revalidated before anyone is served it.
                        // Early refresh: one caller reloads a hot key before it expires.
                        let suspect = entry.stored_at_ms
                            < self.inner.distrust_before_ms.load(Ordering::SeqCst);
                        let refresh = suspect
                            || (early && due_for_refresh(entry.expires_at_ms(), entry.delta_ms));
                        if refresh
                            && matches!(
                                shared.try_lease(&full, &all_tags, &token, lease_ttl).await,
                                Ok(true)
                            )
                        {
                            add(
                                if suspect {
                                    &counters.misses
                                } else {
                                    &counters.early_refreshes
                                },
                                1,
                            );
                            return self
                                .load_and_fill(
                                    shared,
                                    started_epoch,
                                    &full,
                                    namespace,
                                    tags,
                                    &all_tags,
                                    &token,
                                    &counters,
                                    loader,
                                )
                                .await;
                        }
                        if suspect {
                            // Another caller is revalidating it: wait for its value.
                            add(&counters.lease_waits, 1);
                            if Instant::now() >= wait_until {
                                break;
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_millis(25));
                            continue;
                        }
                        add(&counters.shared_hits, 1);
                        if entry.value.is_none() {
                            add(&counters.negative_hits, 1);
                        }
                        let value: Option<Arc<[u8]>> = entry.value.map(Arc::from);
                        self.install(
                            started_epoch,
                            &full,
                            namespace,
                            tags,
                            &all_tags,
                            value.clone(),
                            entry.remaining(),
                            entry.expires_at_ms(),
                            entry.delta_ms,
                        );
                        return Ok((value, Source::Shared));
                    }
                    Ok(Lookup::Lease) => {
                        self.inner.shared_ok();
                        // The lease holder never waits for the local lock: a waiter of this
                        // instance may hold it while polling for the value we are about to load.
                        add(&counters.misses, 1);
                        return self
                            .load_and_fill(
                                shared,
                                started_epoch,
                                &full,
                                namespace,
                                tags,
                                &all_tags,
                                &token,
                                &counters,
                                loader,
                            )
                            .await;
                    }
                    Ok(Lookup::Wait) => {
                        add(&counters.lease_waits, 1);
                        if Instant::now() >= wait_until {
                            break;
                        }
                        if _guard.is_none() {
                            // One poller per key per instance; the others queue here and find
                            // the value when their turn comes.
                            _guard = Some(flight.clone().lock_owned().await);
                            continue;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(25));
                    }
                    Err(err) => {
                        self.shared_failed(&counters, &err);
                        break;
                    }
                }
            }
            // The shared tier failed or the other loader took too long: load, cache nothing.
            add(&counters.misses, 1);
            let (loaded, _) = self.timed_load(&counters, loader).await?;
            return Ok((loaded.map(Arc::from), Source::Loaded));
        }

        let _guard = flight.lock().await;
        // Another task of this instance may have filled it while we waited.
        if let Some(entry) = self.memory_get(&full, &counters) {
            return Ok((entry.bytes, Source::Memory));
        }
        add(&counters.misses, 1);
        let target = Target {
            full: &full,
            namespace,
            tags,
            all_tags: &all_tags,
            ttl,
        };
        self.load_into_memory(target, &counters, loader).await
    }

    /// Memory only: loads, and keeps the value in the in-process tier unless an invalidation
    /// overtook the load.
    async fn load_into_memory<E, F, Fut>(
        &self,
        target: Target<'_>,
        counters: &NsCounters,
        loader: F,
    ) -> Result<(Option<Arc<[u8]>>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let started_epoch = self.inner.epoch.load(Ordering::SeqCst);
        let (loaded, delta) = self.timed_load(counters, loader).await?;
        let value: Option<Arc<[u8]>> = loaded.map(Arc::from);
        self.install_loaded(
            started_epoch,
            target.full,
            target.namespace,
            target.tags,
            target.all_tags,
            value.clone(),
            target.ttl,
            delta,
        );
        Ok((value, Source::Loaded))
    }

    /// The lease holder's work: load, fill the shared tier if the lease still holds, and keep
    /// a copy in the in-process tier.
    #[allow(clippy::too_many_arguments)]
    async fn load_and_fill<E, F, Fut>(
        &self,
        shared: &SharedTier,
        started_epoch: u64,
        full: &str,
        namespace: &str,
        tags: &[String],
        all_tags: &[String],
        token: &str,
        counters: &NsCounters,
        loader: F,
    ) -> Result<(Option<Arc<[u8]>>, Source), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let ttl = self.value_ttl(namespace, true);
        let (loaded, delta) = self.timed_load(counters, loader).await?;
        let ttl = if loaded.is_some() {
            ttl
        } else {
            self.value_ttl(namespace, false)
        };
        let stored = shared
            .store(
                full,
                Some(token),
                &encode(loaded.as_deref(), ttl, delta),
                ttl,
                all_tags,
            )
            .await;
        let value: Option<Arc<[u8]>> = loaded.map(Arc::from);
        match stored {
            Ok(true) => {
                let expires = now_ms() + ttl.as_millis() as u64;
                let delta_ms = delta.as_millis() as u32;
                self.install(
                    started_epoch,
                    full,
                    namespace,
                    tags,
                    all_tags,
                    value.clone(),
                    ttl,
                    expires,
                    delta_ms,
                );
            }
            Ok(false) => add(&counters.stale_sets_refused, 1),
            Err(err) => self.shared_failed(counters, &err),
        }
        Ok((value, Source::Loaded))
    }

    /// The TTL of a value (`found`) or of a cached not-found in `namespace`.
    fn value_ttl(&self, namespace: &str, found: bool) -> Duration {
        let ttl = self.ttl(namespace);
        if found {
            ttl
        } else {
            ttl.min(self.inner.options.negative_ttl)
        }
    }

    /// Memory-only mode: install what this instance just loaded.
    #[allow(clippy::too_many_arguments)]
    fn install_loaded(
        &self,
        started_epoch: u64,
        full: &str,
        namespace: &str,
        tags: &[String],
        all_tags: &[String],
        value: Option<Arc<[u8]>>,
        ttl: Duration,
        delta: Duration,
    ) {
        if self.inner.shared.is_some() {
            return;
        }
        let ttl = if value.is_some() {
            ttl
        } else {
            ttl.min(self.inner.options.negative_ttl)
        };
        let expires = now_ms() + ttl.as_millis() as u64;
        let counters = self.inner.stats.ns(namespace);
        if self.invalidated_since(started_epoch, full, namespace, tags) {
            add(&counters.stale_sets_refused, 1);
            return;
        }
        self.install(
            started_epoch,
            full,
            namespace,
            tags,
            all_tags,
            value,
            ttl,
            expires,
            delta.as_millis() as u32,
        );
    }

    /// Stores `value` unconditionally (a write-through), replacing any lease in progress.
    pub async fn set<T: Serialize>(
        &self,
        namespace: &str,
        key: &str,
        value: &T,
        tags: &[String],
    ) -> Result<(), serde_json::Error> {
        let bytes = serde_json::to_vec(value)?;
        let full = full_key(namespace, key);
        let mut all_tags: Vec<String> = tags.to_vec();
        all_tags.push(format!("ns:{namespace}"));
        let ttl = self.ttl(namespace);
        // A set also overtakes loads in flight: they must not install what they read before.
        self.bump(&[format!("k:{full}")]);
        if let Some(memory) = &self.inner.memory {
            self.inner.tag_index.insert(
                memory,
                full.clone(),
                MemEntry {
                    bytes: Some(bytes.clone().into()),
                    tags: all_tags.clone().into(),
                    ttl,
                    expires_at_ms: now_ms() + ttl.as_millis() as u64,
                    delta_ms: 0,
                },
            );
        }
        if let Some(shared) = self.shared_tier().await {
            let counters = self.inner.stats.ns(namespace);
            if let Err(err) = shared
                .store(
                    &full,
                    None,
                    &encode(Some(&bytes), ttl, Duration::ZERO),
                    ttl,
                    &all_tags,
                )
                .await
            {
                self.shared_failed(&counters, &err);
                self.remember(|p| Invalidation::Keys(vec![full.clone()]).record(p));
                self.inner.breaker.trip();
            }
        }
        if let Some(bus) = &self.inner.bus {
            bus.broadcast(vec![full], Vec::new()).await;
        }
        Ok(())
    }

    /// Reads a cached value without loading.
    pub async fn get<T: DeserializeOwned>(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<T>, serde_json::Error> {
        let full = full_key(namespace, key);
        let counters = self.inner.stats.ns(namespace);
        if let Some(hit) = self.memory_get(&full, &counters) {
            return hit.bytes.map(|b| serde_json::from_slice(&b)).transpose();
        }
        if let Some(shared) = self.shared_tier().await {
            match shared.get(&full).await {
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

    /// Removes one key. When this returns, no reader gets the old value from this engine's
    /// tiers, and no load that started before can install it. If Redis cannot be reached the
    /// invalidation is remembered and delivered before Redis is read again.
    pub async fn invalidate(&self, namespace: &str, key: &str) {
        self.invalidate_keys(namespace, &[key]).await;
    }

    /// [`invalidate`](Self::invalidate) for several keys of one namespace: one shared-tier
    /// call and one bus message for all of them.
    pub async fn invalidate_keys(&self, namespace: &str, keys: &[&str]) {
        if keys.is_empty() {
            return;
        }
        let full: Vec<String> = keys.iter().map(|k| full_key(namespace, k)).collect();
        add(
            &self.inner.stats.ns(namespace).invalidations,
            full.len() as u64,
        );
        self.forget_keys(&full);
        if self.inner.shared.is_some() {
            self.deliver(namespace, Invalidation::Keys(full.clone()))
                .await;
            // Again, after the shared tier's delete: a reader that started after the first
            // bump may have read the old value from the shared tier before the delete; the
            // second bump refuses its install, the second removal drops it if it got in.
            self.forget_keys(&full);
        }
        if let Some(bus) = &self.inner.bus {
            bus.broadcast(full, Vec::new()).await;
        }
    }

    /// Removes `full` keys from this instance's in-process tier and marks them invalidated.
    fn forget_keys(&self, full: &[String]) {
        let marks: Vec<String> = full.iter().map(|k| format!("k:{k}")).collect();
        self.bump(&marks);
        if let Some(memory) = &self.inner.memory {
            for key in full {
                memory.invalidate(key);
            }
        }
    }

    /// Removes values carrying any of `tags` from the in-process tier and marks the tags.
    fn forget_tags(&self, tags: &[String]) {
        let marks: Vec<String> = tags.iter().map(|t| format!("t:{t}")).collect();
        self.bump(&marks);
        if let Some(memory) = &self.inner.memory {
            self.inner.tag_index.invalidate(memory, tags);
        }
    }

    /// Removes every value carrying `tag`.
    pub async fn invalidate_tag(&self, tag: &str) {
        self.invalidate_tags(&[tag.to_string()]).await;
    }

    /// Removes every value carrying any of `tags`: one shared-tier call and one bus message
    /// for all of them, however many (a write that affects many cached answers).
    pub async fn invalidate_tags(&self, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        self.forget_tags(tags);
        if self.inner.shared.is_some() {
            self.deliver("tags", Invalidation::Tags(tags.to_vec()))
                .await;
            // As for keys: readers that read the shared tier before its delete.
            self.forget_tags(tags);
        }
        if let Some(bus) = &self.inner.bus {
            bus.broadcast(Vec::new(), tags.to_vec()).await;
        }
    }

    /// Removes every value of a namespace.
    pub async fn invalidate_namespace(&self, namespace: &str) {
        add(&self.inner.stats.ns(namespace).invalidations, 1);
        self.bump(&[format!("n:{namespace}")]);
        self.invalidate_tag(&format!("ns:{namespace}")).await;
    }

    /// Removes expired rows of the PostgreSQL tier every `interval` until shutdown (a no-op
    /// loop for the other tiers, which expire entries themselves).
    pub async fn run_cleanup(self, interval: Duration, mut stop: ShutdownSignal) {
        let Some(SharedTier::Postgres(pg)) = &self.inner.shared else {
            return;
        };
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tokio::time::sleep(interval) => match pg.cleanup().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::debug!(removed, "expired cache rows removed"),
                    Err(err) => tracing::warn!(error = %err, "cache cleanup failed"),
                },
            }
        }
    }

    // --- internals ---

    fn memory_get(&self, full: &str, counters: &NsCounters) -> Option<MemEntry> {
        if self.inner.bus.as_ref().is_some_and(|bus| !bus.trusted()) {
            return None;
        }
        let entry = self.inner.memory.as_ref()?.get(full)?;
        add(&counters.near_hits, 1);
        if entry.bytes.is_none() {
            add(&counters.negative_hits, 1);
        }
        Some(entry)
    }

    /// Puts a value into the in-process tier, unless the bus is not trusted right now or an
    /// invalidation overtook the read. `ttl` is the time it has left.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        started_epoch: u64,
        full: &str,
        namespace: &str,
        tags: &[String],
        all_tags: &[String],
        value: Option<Arc<[u8]>>,
        ttl: Duration,
        expires_at_ms: u64,
        delta_ms: u32,
    ) {
        let Some(memory) = &self.inner.memory else {
            return;
        };
        if ttl.is_zero()
            || self.inner.bus.as_ref().is_some_and(|bus| !bus.trusted())
            || self.invalidated_since(started_epoch, full, namespace, tags)
        {
            return;
        }
        let entry = MemEntry {
            bytes: value,
            tags: all_tags.to_vec().into(),
            ttl,
            expires_at_ms,
            delta_ms,
        };
        self.inner.tag_index.insert(memory, full.to_string(), entry);
        // Check again after the insert: an invalidation bumps the epoch *before* it removes,
        // so either its removal comes after our insert, or this check sees its bump.
        if self.invalidated_since(started_epoch, full, namespace, tags) {
            memory.invalidate(full);
        }
    }

    fn flight(&self, full: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Drop locks nobody holds any more, so the map does not grow without bound.
        if flights.len() > 1024 {
            flights.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        flights.entry(full.to_string()).or_default().clone()
    }

    async fn timed_load<E, F, Fut>(
        &self,
        counters: &NsCounters,
        loader: F,
    ) -> Result<(Option<Vec<u8>>, Duration), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let started = Instant::now();
        let result = loader().await;
        let elapsed = started.elapsed();
        add(&counters.loads, 1);
        add(&counters.load_micros, elapsed.as_micros() as u64);
        result.map(|loaded| (loaded, elapsed))
    }

    fn bump(&self, marks: &[String]) {
        self.inner.bump(marks);
    }

    fn invalidated_since(&self, epoch: u64, full: &str, namespace: &str, tags: &[String]) -> bool {
        if self.inner.epoch.load(Ordering::SeqCst) == epoch {
            return false;
        }
        let marks = [
            format!("k:{full}"),
            format!("n:{namespace}"),
            format!("t:ns:{namespace}"),
        ];
        self.inner.invalidated.any_after(
            epoch,
            marks
                .into_iter()
                .chain(tags.iter().map(|t| format!("t:{t}"))),
        )
    }

    fn remember(&self, f: impl FnOnce(&mut Pending)) {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut pending);
    }

    fn shared_failed(&self, counters: &NsCounters, err: &TierError) {
        add(&counters.shared_errors, 1);
        self.inner.outage.store(true, Ordering::SeqCst);
        if self.inner.breaker.failure() {
            tracing::warn!(error = %err, "Redis cache tier failing: breaker open, reading through to the source");
        }
    }

    /// Sends an invalidation to Redis, or remembers it (and keeps Redis out of reads) when
    /// Redis cannot take it now.
    async fn deliver(&self, namespace: &str, what: Invalidation) {
        let Some(shared) = self.inner.shared.as_ref() else {
            return;
        };
        // An invalidation matters more than a read: it goes to the shared tier even while the
        // breaker keeps reads away (other instances may be reading it), and is retried a few
        // times, each under the deadline, before it is only remembered.
        let mut last = None;
        for attempt in 0..DELIVERY_ATTEMPTS {
            let result = match &what {
                Invalidation::Keys(keys) => shared.invalidate_keys(keys).await,
                Invalidation::Tags(tags) => shared.invalidate_tags(tags).await.map(|_| ()),
            };
            match result {
                Ok(()) => return,
                Err(err) => {
                    tracing::debug!(attempt, error = %err, "invalidation not delivered yet");
                    last = Some(err);
                }
            }
        }
        self.remember(|p| what.record(p));
        if let Some(err) = last {
            let counters = self.inner.stats.ns(namespace);
            self.shared_failed(&counters, &err);
        }
        // Until it is delivered, the shared tier may hold the old value: stop reading it.
        self.inner.breaker.trip();
    }

    /// The Redis tier if it may be used now. Undelivered invalidations are replayed first;
    /// if that fails, Redis stays out of the way.
    async fn shared_tier(&self) -> Option<&SharedTier> {
        let shared = self.inner.shared.as_ref()?;
        match self.inner.breaker.permit() {
            Permit::Skip => return None,
            Permit::Call | Permit::Probe => {}
        }
        let has_pending = {
            let p = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            !p.keys.is_empty() || !p.tags.is_empty()
        };
        if has_pending && !self.replay_pending(shared).await {
            self.inner.breaker.abandon_probe();
            return None;
        }
        Some(shared)
    }

    /// Replays undelivered invalidations if there are any and the breaker lets a call through.
    pub(crate) async fn replay_if_pending(&self) {
        let has_pending = {
            let p = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            !p.keys.is_empty() || !p.tags.is_empty()
        };
        if has_pending {
            let _ = self.shared_tier().await;
        }
    }

    async fn replay_pending(&self, shared: &SharedTier) -> bool {
        let _one = self.inner.replay.lock().await;
        let (keys, tags) = {
            let mut p = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut p.keys), std::mem::take(&mut p.tags))
        };
        if keys.is_empty() && tags.is_empty() {
            return true;
        }
        let delivered_keys: Vec<String> = keys.iter().cloned().collect();
        let delivered_tags: Vec<String> = tags.iter().cloned().collect();
        let mut failed_keys = HashSet::new();
        let mut failed_tags = HashSet::new();
        if !keys.is_empty() {
            let all: Vec<String> = keys.into_iter().collect();
            if shared.invalidate_keys(&all).await.is_err() {
                failed_keys.extend(all);
            }
        }
        if !tags.is_empty() {
            let all: Vec<String> = tags.into_iter().collect();
            if shared.invalidate_tags(&all).await.is_err() {
                failed_tags.extend(all);
            }
        }
        let ok = failed_keys.is_empty() && failed_tags.is_empty();
        if let Some(bus) = &self.inner.bus {
            // Instances that missed them while the bus was down flushed their tiers when it
            // came back; this reaches the ones whose bus never dropped.
            bus.announce(delivered_keys, delivered_tags).await;
        }
        if ok {
            tracing::info!("Redis cache tier back: undelivered invalidations replayed");
            self.inner.shared_ok();
        } else {
            self.remember(|p| {
                p.keys.extend(failed_keys);
                p.tags.extend(failed_tags);
            });
        }
        ok
    }
}
