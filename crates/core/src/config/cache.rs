//! The cache engine: which shared tier, the namespaces' TTLs and key names, the key prefix.
//!
//! The core does not know the applications' namespaces: each module registers its own
//! ([`Namespace`]) with its default TTL and, where a seed names them, its key name.
//! `CACHE_TTLS_JSON` overrides registered TTLs and refuses names nobody registered (a typo
//! would otherwise silently keep the default).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::parser::{Parser, SECOND};

/// The shared tier, the namespaces' TTLs and the key prefix.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawCache {
    /// Shared cache tier: redis, postgres (UNLOGGED table, seed 002) or memory [default: redis
    /// when REDIS_URL is set, else memory].
    #[arg(long, env = "CACHE_BACKEND", global = true)]
    pub cache_backend: Option<String>,
    /// Per-namespace TTLs as a JSON object of milliseconds, e.g. {"assets":300000} (seed 003).
    #[arg(long, env = "CACHE_TTLS_JSON", global = true)]
    pub cache_ttls_json: Option<String>,
    /// TTL of namespaces without their own [default: 300s].
    #[arg(long, env = "CACHE_DEFAULT_TTL", global = true)]
    pub cache_default_ttl: Option<String>,
    /// How often expired rows leave the PostgreSQL cache table [default: 60s].
    #[arg(long, env = "CACHE_CLEANUP_INTERVAL", global = true)]
    pub cache_cleanup_interval: Option<String>,
    /// Namespaces refreshed early (probabilistically, before expiry, by one caller), comma-separated.
    #[arg(long, env = "CACHE_EARLY_REFRESH", global = true)]
    pub cache_early_refresh: Option<String>,
    /// Prefix of every key Cascade writes to Redis [default: cascade:].
    #[arg(long, env = "CACHE_KEY_PREFIX", global = true)]
    pub cache_key_prefix: Option<String>,
    /// Batched reads of namespaces whose lookups all miss read PostgreSQL without a Redis
    /// lookup first (true/false) [default: true]; not while Redis evicts keys.
    #[arg(long, env = "CACHE_SPECULATIVE_LOADS", global = true)]
    pub cache_speculative_loads: Option<String>,
    /// Bound of the in-process tier in bytes (keys and values, plus 64 per entry); 0 turns the
    /// tier off [default: 67108864].
    #[arg(long, env = "CACHE_MEMORY_BYTES", global = true)]
    pub cache_memory_bytes: Option<String>,
}

/// A cache namespace a module owns: its name, its default TTL and, when a seed names its keys
/// differently (seed 003's `cache:asset:<versionId>` for `assets`), that key name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: &'static str,
    /// None: `CACHE_DEFAULT_TTL`.
    pub ttl: Option<Duration>,
    pub key_name: Option<&'static str>,
}

impl Namespace {
    pub const fn new(name: &'static str, ttl: Duration) -> Namespace {
        Namespace {
            name,
            ttl: Some(ttl),
            key_name: None,
        }
    }

    /// A namespace whose TTL is `CACHE_DEFAULT_TTL` unless `CACHE_TTLS_JSON` names it.
    pub const fn default_ttl(name: &'static str) -> Namespace {
        Namespace {
            name,
            ttl: None,
            key_name: None,
        }
    }

    /// Keys of this namespace are `<key_name>:<key>` instead of `<name>:<key>`.
    pub const fn keyed(self, key_name: &'static str) -> Namespace {
        Namespace {
            key_name: Some(key_name),
            ..self
        }
    }
}

/// The in-process tier's default bound (`CACHE_MEMORY_BYTES`): 64 MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// The smallest bound `CACHE_MEMORY_BYTES` takes, but for 0: below it, hardly an entry fits.
pub const MIN_MEMORY_BYTES: u64 = 64 * 1024;

/// Which shared tier sits behind the in-process near cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Redis,
    Postgres,
    Memory,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub backend: CacheBackend,
    /// TTL of each named namespace (seed defaults, then CACHE_TTLS_JSON).
    pub ttls: BTreeMap<String, Duration>,
    /// The key name of each namespace that has one of its own (seed 003's `cache:asset` for
    /// `assets`); other namespaces' keys are named after the namespace.
    pub key_names: BTreeMap<String, String>,
    pub default_ttl: Duration,
    pub cleanup_interval: Duration,
    pub key_prefix: String,
    /// Namespaces whose hot keys are reloaded shortly before they expire.
    pub early_refresh: BTreeSet<String>,
    /// Batched reads may load without a lookup (`EngineOptions::speculative_loads` too).
    pub speculative_loads: bool,
    /// The in-process tier's bound in bytes, 0 for none: what the application gives
    /// `EngineOptions::memory_bytes`.
    pub memory_bytes: u64,
}

impl CacheConfig {
    /// The TTL of a namespace, or the default TTL when it has none of its own.
    pub fn ttl(&self, namespace: &str) -> Duration {
        self.ttls
            .get(namespace)
            .copied()
            .unwrap_or(self.default_ttl)
    }

    /// The name a namespace's keys start with: its registered key name, else the namespace.
    pub fn key_name<'a>(&'a self, namespace: &'a str) -> &'a str {
        self.key_names
            .get(namespace)
            .map_or(namespace, String::as_str)
    }
}

impl CacheConfig {
    pub(super) fn parse(
        p: &mut Parser,
        raw: &RawCache,
        has_redis: bool,
        redis_url_set: bool,
        namespaces: &[Namespace],
    ) -> CacheConfig {
        let backend = match raw
            .cache_backend
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => {
                if has_redis {
                    CacheBackend::Redis
                } else {
                    CacheBackend::Memory
                }
            }
            Some("redis") => {
                // An invalid REDIS_URL is reported as such, not again here.
                if !has_redis && !redis_url_set {
                    p.fail("CACHE_BACKEND", "is redis but REDIS_URL is not set");
                }
                CacheBackend::Redis
            }
            Some("postgres" | "postgresql") => CacheBackend::Postgres,
            Some("memory") => CacheBackend::Memory,
            Some(other) => {
                p.fail(
                    "CACHE_BACKEND",
                    format!("expected redis, postgres or memory, got {other:?}"),
                );
                CacheBackend::Memory
            }
        };

        let mut ttls = BTreeMap::new();
        let mut key_names = BTreeMap::new();
        let mut known = BTreeSet::new();
        for ns in namespaces {
            // Two modules claiming one namespace would invalidate each other's entries.
            assert!(
                known.insert(ns.name),
                "cache namespace {:?} is registered twice",
                ns.name
            );
            if let Some(ttl) = ns.ttl {
                ttls.insert(ns.name.to_string(), ttl);
            }
            if let Some(key_name) = ns.key_name {
                key_names.insert(ns.name.to_string(), key_name.to_string());
            }
        }
        if let Some(json) = raw.cache_ttls_json.as_deref() {
            Self::override_ttls(p, json, &known, &mut ttls);
        }

        let key_prefix = raw
            .cache_key_prefix
            .clone()
            .unwrap_or_else(|| "cascade:".into());
        if key_prefix.chars().any(|c| c.is_whitespace()) {
            p.fail("CACHE_KEY_PREFIX", "must not contain white space");
        }

        CacheConfig {
            backend,
            ttls,
            key_names,
            default_ttl: p.positive_duration(
                "CACHE_DEFAULT_TTL",
                &raw.cache_default_ttl,
                300 * SECOND,
            ),
            cleanup_interval: p.positive_duration(
                "CACHE_CLEANUP_INTERVAL",
                &raw.cache_cleanup_interval,
                60 * SECOND,
            ),
            key_prefix,
            speculative_loads: p.boolean(
                "CACHE_SPECULATIVE_LOADS",
                &raw.cache_speculative_loads,
                true,
            ),
            memory_bytes: Self::memory_bytes(p, raw, backend),
            early_refresh: raw
                .cache_early_refresh
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|ns| !ns.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    /// `CACHE_MEMORY_BYTES`: 0 (no in-process tier) only where a shared tier caches instead,
    /// and otherwise at least [`MIN_MEMORY_BYTES`] (a smaller bound holds no entry at all).
    fn memory_bytes(p: &mut Parser, raw: &RawCache, backend: CacheBackend) -> u64 {
        const VAR: &str = "CACHE_MEMORY_BYTES";
        let bytes = p.number(
            VAR,
            raw.cache_memory_bytes.as_deref(),
            DEFAULT_MEMORY_BYTES,
            "a number of bytes (0 turns the in-process tier off)",
        );
        if bytes == 0 && backend == CacheBackend::Memory {
            p.fail(
                VAR,
                "is 0, but there is no shared tier (CACHE_BACKEND memory, or no REDIS_URL): nothing would be cached",
            );
        } else if bytes > 0 && bytes < MIN_MEMORY_BYTES {
            p.fail(
                VAR,
                format!("must be 0 (off) or at least {MIN_MEMORY_BYTES}, got {bytes}"),
            );
        }
        bytes
    }

    /// `CACHE_TTLS_JSON`: `{"namespace": milliseconds, ...}` over registered namespaces only.
    fn override_ttls(
        p: &mut Parser,
        json: &str,
        known: &BTreeSet<&'static str>,
        ttls: &mut BTreeMap<String, Duration>,
    ) {
        let map = match serde_json::from_str::<serde_json::Value>(json) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                return p.fail(
                    "CACHE_TTLS_JSON",
                    "expected a JSON object of namespace to milliseconds, e.g. {\"assets\":300000}",
                );
            }
            Err(err) => return p.fail("CACHE_TTLS_JSON", format!("is not valid JSON: {err}")),
        };
        for (namespace, value) in map {
            if !known.contains(namespace.as_str()) {
                let known: Vec<&str> = known.iter().copied().collect();
                p.fail(
                    "CACHE_TTLS_JSON",
                    format!(
                        "no cache namespace is called {namespace:?}; the namespaces are {}",
                        known.join(", ")
                    ),
                );
                continue;
            }
            match value.as_u64() {
                Some(ms) if ms > 0 => {
                    ttls.insert(namespace, Duration::from_millis(ms));
                }
                _ => p.fail(
                    "CACHE_TTLS_JSON",
                    format!(
                        "the TTL of {namespace:?} must be a positive whole number of milliseconds, got {value}"
                    ),
                ),
            }
        }
    }
}
