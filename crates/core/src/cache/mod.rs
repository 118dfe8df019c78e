//! The cache engine: namespaces with TTLs, `get_or_load` with single-flight and leases, tags,
//! negative caching, and a Redis tier behind a circuit breaker.
//!
//! Tiers. With Redis configured, the shared tier is Redis: one loader per key cluster-wide
//! (a lease; in a namespace whose lookups all miss lately, a speculative load per key per
//! instance instead, which takes no lease, `lease.rs`), no stale set after an invalidation
//! (the fill is refused once the lease is gone; a speculative store, where a recent
//! invalidation's tombstone is found or past its deadline).
//! Without Redis, an in-process tier bounded by bytes serves a single instance.
//!
//! Values are serialised once, as JSON: they are mostly API payloads, so the cached bytes can
//! be sent as a response body as they are, and stay readable with `redis-cli`.
//!
//! Redis failure: every call has the `REDIS_TIMEOUT` deadline; failures trip a breaker and
//! reads go straight to the loader (PostgreSQL) with no error to the caller. Invalidations that
//! cannot reach Redis are remembered and replayed before Redis is read again, so a Redis that
//! was only paused (SIGSTOP, keeping its old data) never serves a value invalidated meanwhile.
//! While Redis does not answer, a write spends at most `REDIS_TIMEOUT` + max(`REDIS_TIMEOUT`,
//! the bus's 300 ms window) on its invalidations, however many it makes (`invalidate.rs`).
//! What an instance could not deliver or announce is also written to PostgreSQL before the
//! write returns, so the other instances apply it even if this one dies (`log.rs`).
//!
//! Where things are:
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the public types, the engine's state ([`Cache`], `Inner`), construction |
//! | `read.rs` | the read path's three steps (near hit, shared tier, load here); installing |
//! | `lease.rs` | its shared-tier step: lookup with lease, polling with backoff, fill |
//! | `invalidate.rs` | `set`, invalidations, their marks, and their replay after an outage |
//! | `log.rs`, `log_reader.rs` | the durable log of what could not be delivered; every instance's reading of it |
//! | `batcher.rs` | concurrent invalidations merged into one shared-tier round and bus message |
//! | `load_batch.rs` | concurrent loads of one namespace merged into one loader call and one fill round |
//! | `lookup_batch.rs` | concurrent lookups of batched reads merged into one lookup script |
//! | `lead_queue.rs` | the queue and lead hand-off both read batchers share |
//! | `codec.rs` | the stored form of a value (header, XFetch early-refresh test) |
//! | `tier.rs`, `redis_tier.rs`, `pg_tier.rs` | the shared tier and its two backends |
//! | `bus.rs` | keeping the instances' in-process tiers coherent |
//! | `tag_index.rs`, `marks.rs` | which keys carry a tag; what was invalidated when |
//! | `front.rs` | each worker thread's copies of the in-process entries it read last |
//! | `breaker.rs`, `stats.rs` | the shared tier's circuit breaker; per-namespace counters |
//! | `unified.rs` | copying Redis's entries into PostgreSQL (`cascade migrate-to-unified`) |

mod batcher;
mod breaker;
pub mod buckets;
pub(crate) mod bus;
mod codec;
mod front;
mod invalidate;
mod lead_queue;
mod lease;
mod load_batch;
mod log;
mod log_reader;
mod lookup_batch;
mod marks;
mod pg_tier;
mod read;
mod redis_tier;
mod stats;
mod tag_index;
mod tier;
pub mod unified;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache as Moka;

pub use breaker::BreakerState;
pub use invalidate::Invalidations;
pub use redis_tier::scripts_read_info;
pub use stats::NamespaceStats;

/// [`Cache::memory_usage`]: the in-process tier's entries and the bytes its bound counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    pub entries: u64,
    pub weighted_bytes: u64,
    pub capacity_bytes: u64,
}

use self::batcher::Batcher;
use self::breaker::Breaker;
use self::bus::Bus;
use self::invalidate::Pending;
use self::load_batch::{DeferredFills, LoadGroups};
use self::marks::Marks;
use self::pg_tier::PgTier;
use self::redis_tier::RedisTier;
use self::stats::Stats;
use self::tag_index::TagIndex;
use self::tier::SharedTier;
use crate::config::{CacheBackend, CacheConfig};
use crate::db::Db;
use crate::redis::Redis;

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

impl Backend {
    /// The tier `config.backend` asks for, given what this process connected to: Redis when
    /// it is configured and a client is given, PostgreSQL (on `db`) when it is configured,
    /// else in-process only.
    pub fn choose(config: &CacheConfig, redis: Option<&Redis>, db: &Db) -> Backend {
        match (config.backend, redis) {
            (CacheBackend::Redis, Some(redis)) => Backend::Redis(redis.clone()),
            (CacheBackend::Postgres, _) => Backend::Postgres(db.clone()),
            _ => Backend::Memory,
        }
    }
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
    /// How often the invalidation log is read when nothing else prompted it (`log.rs`): the
    /// bound on how long an instance may miss an invalidation another one could not deliver,
    /// when its `LISTEN` connection was down.
    pub invalidation_log_poll: Duration,
    /// Batched reads of a namespace whose lookups all miss lately load without a lookup and
    /// store their row afterwards (`lease.rs`, speculative loads): a miss waits for its load
    /// alone, and a value found in Redis wastes the load. Off: every read loads only after
    /// its lease.
    pub speculative_loads: bool,
    /// The longest after a speculative load began that its store may run, by Redis's clock,
    /// and still be taken (capped by half of `REDIS_TIMEOUT` and half of the tombstones' 1 s).
    pub speculation_window: Duration,
}

impl EngineOptions {
    /// The defaults, with what the configuration sets (`CACHE_MEMORY_BYTES`).
    pub fn configured(config: &CacheConfig) -> Self {
        Self {
            memory_bytes: config.memory_bytes,
            ..Self::default()
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            negative_ttl: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            lease_wait: Duration::from_secs(2),
            memory_bytes: crate::config::DEFAULT_MEMORY_BYTES,
            breaker_threshold: 3,
            breaker_cool_down: Duration::from_millis(500),
            invalidation_log_poll: Duration::from_secs(5),
            speculative_loads: true,
            speculation_window: Duration::from_millis(100),
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

/// Where a `get_or_load` answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory,
    Shared,
    Loaded,
}

/// A cached value as an HTTP handler serves it: the bytes, and their strong validator (ETag),
/// computed at most once per in-process entry however many requests it serves.
#[derive(Clone)]
pub struct CachedBody {
    bytes: Arc<[u8]>,
    etag: Arc<OnceLock<Bytes>>,
}

impl CachedBody {
    fn new(bytes: Arc<[u8]>, etag: Arc<OnceLock<Bytes>>) -> CachedBody {
        CachedBody { bytes, etag }
    }

    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    pub fn into_bytes(self) -> Arc<[u8]> {
        self.bytes
    }

    /// `"<32 hex digits>"`: the first 128 bits of the bytes' SHA-256, the same on every
    /// instance for the same bytes. Shared: a header made of it copies nothing.
    pub fn etag(&self) -> Bytes {
        self.etag.get_or_init(|| etag(&self.bytes).into()).clone()
    }
}

/// The tag every value of `namespace` carries in the shared tier and the marks: a namespace
/// is invalidated as this tag (in process, by its generation as well).
pub(super) fn namespace_tag(namespace: &str) -> String {
    format!("ns:{namespace}")
}

/// The namespace `tag` stands for, if it is a [`namespace_tag`].
pub(super) fn tag_namespace(tag: &str) -> Option<&str> {
    tag.strip_prefix("ns:")
}

/// `"<32 hex digits>"`: the first 128 bits of `bytes`' SHA-256, quoted (a strong ETag).
pub fn etag(bytes: &[u8]) -> String {
    use sha2::Digest;
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(bytes);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    for byte in &digest[..16] {
        tag.push(char::from(DIGITS[usize::from(byte >> 4)]));
        tag.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    tag.push('"');
    tag
}

/// One in-process entry. `bytes == None` is a cached "not found".
#[derive(Clone)]
struct MemEntry {
    bytes: Option<Arc<[u8]>>,
    /// The ETag of `bytes`, once a caller asked for it ([`CachedBody::etag`]).
    etag: Arc<OnceLock<Bytes>>,
    /// Its namespace's [`generation`](stats::NsCounters::generation) when it was installed:
    /// served only while that is still the namespace's.
    generation: u64,
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

/// A cheap-to-clone handle on the engine.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: CacheConfig,
    /// Keeps the in-process tiers of all instances coherent (Redis backend only).
    bus: Option<Bus>,
    /// The bus's task and the log's watcher, so the application can stop them when it stops
    /// (the bus would otherwise run, heartbeating as a live instance, for as long as any clone
    /// of this handle exists).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The durable log of undelivered invalidations (Redis tier, once attached: `log.rs`).
    log: OnceLock<log::InvalidationLog>,
    options: EngineOptions,
    memory: Option<Moka<String, MemEntry>>,
    /// Each worker thread's copies of the entries it read last (`front.rs`); told of every
    /// change to `memory`.
    front: front::Front,
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
    /// No speculative load before this (wall clock, ms): Redis said its tombstones are not
    /// yet complete (`lease.rs`).
    unsettled_until_ms: AtomicU64,
    /// Speculative loads and stores in flight (`lease.rs`).
    settling: std::sync::atomic::AtomicUsize,
    /// Serialises replays of `pending` so one caller does it.
    replay: tokio::sync::Mutex<()>,
    /// Concurrent invalidations, merged into shared rounds (`batcher.rs`).
    batcher: Batcher,
    /// Concurrent batched loads of each namespace (`load_batch.rs`).
    load_groups: LoadGroups,
    /// Speculative loads' stores waiting for their script (`load_batch.rs`).
    deferred_fills: DeferredFills,
    stats: Stats,
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
                tasks: Mutex::default(),
                log: OnceLock::new(),
                breaker: Breaker::new(options.breaker_threshold, options.breaker_cool_down),
                config,
                options,
                memory,
                front: front::Front::default(),
                tag_index: TagIndex::default(),
                shared,
                flights: Mutex::default(),
                epoch: AtomicU64::new(0),
                invalidated,
                pending: Mutex::default(),
                outage: AtomicBool::new(false),
                distrust_before_ms: AtomicU64::new(0),
                unsettled_until_ms: AtomicU64::new(0),
                settling: Default::default(),
                replay: tokio::sync::Mutex::new(()),
                batcher: Batcher::default(),
                load_groups: LoadGroups::default(),
                deferred_fills: DeferredFills::default(),
                stats: Stats::default(),
            }),
        };
        if cache.inner.bus.is_some() {
            let task = tokio::spawn(bus::run(Arc::downgrade(&cache.inner)));
            cache
                .inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
        cache
    }

    /// Stops the bus and the invalidation log's watcher (an application that stops): this
    /// instance no longer heartbeats, acknowledges or hears invalidations, so its in-process
    /// tier is no longer trusted.
    pub fn stop_bus(&self) {
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
        }
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

    /// The in-process tier's size against its bound (`CACHE_MEMORY_BYTES`), after the
    /// evictions and expiries it had pending; None without one. The bytes are what its bound
    /// counts (each entry's key and body, plus 64): the process holds more than that, moka's
    /// own bookkeeping and the allocator's among it.
    pub fn memory_usage(&self) -> Option<MemoryUsage> {
        let memory = self.inner.memory.as_ref()?;
        memory.run_pending_tasks();
        Some(MemoryUsage {
            entries: memory.entry_count(),
            weighted_bytes: memory.weighted_size(),
            capacity_bytes: self.inner.options.memory_bytes,
        })
    }

    /// The key of `key` in `namespace`, as every tier and the bus name it (without the
    /// prefix): `<key name>:<key>`, where the key name is the one registered for the
    /// namespace in [`CacheConfig::key_names`] (kept as the seeds wrote them), else the
    /// namespace itself. The namespace, not the key name, carries the TTL and the
    /// `ns:<namespace>` tag.
    pub fn full_key(&self, namespace: &str, key: &str) -> String {
        // Built by hand: `format!` costs a hot read more than the rest of its key handling.
        let name = self.inner.config.key_name(namespace);
        let mut full = String::with_capacity(name.len() + 1 + key.len());
        full.push_str(name);
        full.push(':');
        full.push_str(key);
        full
    }
}
