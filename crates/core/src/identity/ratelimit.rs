//! Rate limiting with GCRA (the generic cell rate algorithm).
//!
//! A limit of `N` per `period` admits one request every `period / N` on average with a burst
//! of `N`. The state per key is one number, the theoretical arrival time (TAT). In Redis it is
//! updated by one Lua script, atomically, against Redis's own clock, so every instance shares
//! one budget per key (`<prefix>ratelimit:<class>:<key>`).
//!
//! In unified mode (`CACHE_BACKEND=postgres`, no Redis) the TAT lives in PostgreSQL's UNLOGGED
//! table `rate_limits`, updated by one statement against PostgreSQL's clock: the instances
//! share one budget per key exactly as on Redis, whichever instance a client reaches.
//!
//! When Redis (or, in unified mode, PostgreSQL) is unreachable, or neither is configured, each
//! instance limits locally with the same algorithm and `1/n` of the budget, `n` being the
//! number of live instances last heard on the cache bus: together they admit about what the
//! shared store would have, so the cluster neither fails open nor locks everyone out. After a
//! shared-store error the local limiter is used for [`REDIS_RETRY`] before it is tried again.
//!
//! Per-address keys name a client's network, not its address ([`client_network`]): an IPv6
//! client picks any of the 2^64 addresses of its /64 at will.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

use crate::cache::Cache;
use crate::config::RateLimit;
use crate::db::Db;
use crate::redis::Redis;

use super::local_table::LocalTable;
use super::login_limit::LoginLocal;

/// How long the local limiter is used after Redis failed, before Redis is tried again.
pub const REDIS_RETRY: Duration = Duration::from_secs(1);

const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > tau then
  return {0, 0, tat - now, ahead - tau}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(ahead / 1000) + 1)
return {1, math.floor((tau - ahead) / interval), ahead, 0}
";

/// [`GCRA`] on PostgreSQL (unified mode), one statement: `$1` the key, `$2` the interval and
/// `$3` tau (interval × burst), in microseconds. The upsert takes the key's row lock and its
/// `WHERE` sees the latest TAT, so concurrent checks on any instance are serialised as the
/// Lua script is. Returns the new TAT when admitted (NULL when not), the TAT before (for the
/// headers of a refusal), and now.
const GCRA_SQL: &str = "
WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS us),
prev AS (SELECT tat_us FROM rate_limits WHERE key = $1),
up AS (
  INSERT INTO rate_limits AS r (key, tat_us, expires_at)
  SELECT $1, us + $2, to_timestamp((us + $2) / 1000000.0::float8) FROM now
  ON CONFLICT (key) DO UPDATE
    SET tat_us = greatest(r.tat_us + $2, EXCLUDED.tat_us),
        expires_at = to_timestamp(greatest(r.tat_us + $2, EXCLUDED.tat_us) / 1000000.0::float8)
    WHERE greatest(r.tat_us + $2, EXCLUDED.tat_us) - (EXCLUDED.tat_us - $2) <= $3
  RETURNING tat_us
)
SELECT (SELECT tat_us FROM up), (SELECT tat_us FROM prev), (SELECT us FROM now)";

/// The verdict on one request, with what the `RateLimit-*` headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst size in force (divided among instances when limiting locally).
    pub limit: u32,
    pub remaining: u32,
    /// Until the budget is whole again.
    pub reset: Duration,
    /// Until the next request would be admitted (zero when allowed).
    pub retry_after: Duration,
    /// Decided by this instance alone (Redis unavailable).
    pub local: bool,
}

#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Option<Redis>,
    /// Unified mode's shared store, when there is no Redis.
    postgres: Option<Db>,
    cache: Cache,
    prefix: String,
    script: Script,
    origin: Instant,
    /// Micros since `origin` before which Redis is not tried.
    skip_redis_until: AtomicU64,
    /// GCRA's theoretical arrival times (micros since `origin`), each entry expiring at its
    /// own. A `std` mutex: held for a map operation, never across an await.
    local: Mutex<LocalTable<u64>>,
    /// The login backoff's state while Redis is unavailable.
    pub(super) login: Mutex<LoginLocal>,
}

impl RateLimiter {
    pub fn new(redis: Option<Redis>, cache: Cache, prefix: &str) -> Self {
        Self::build(redis, None, cache, prefix)
    }

    /// Unified mode: the budgets are shared through PostgreSQL's `rate_limits` (the login
    /// backoff stays per instance, with `1/n` of the free failures).
    pub fn on_postgres(db: Db, cache: Cache, prefix: &str) -> Self {
        Self::build(None, Some(db), cache, prefix)
    }

    fn build(redis: Option<Redis>, postgres: Option<Db>, cache: Cache, prefix: &str) -> Self {
        RateLimiter {
            inner: Arc::new(Inner {
                redis,
                postgres,
                cache,
                prefix: prefix.to_string(),
                script: Script::new(GCRA),
                origin: Instant::now(),
                skip_redis_until: AtomicU64::new(0),
                local: Mutex::default(),
                login: Mutex::default(),
            }),
        }
    }

    pub(super) fn micros(&self) -> u64 {
        self.inner.origin.elapsed().as_micros() as u64
    }

    /// Redis, unless it failed within the last [`REDIS_RETRY`].
    pub(super) fn shared(&self) -> Option<&Redis> {
        self.inner
            .redis
            .as_ref()
            .filter(|_| self.micros() >= self.inner.skip_redis_until.load(Ordering::Relaxed))
    }

    /// Limits locally for [`REDIS_RETRY`].
    pub(super) fn redis_failed(&self) {
        self.inner.skip_redis_until.store(
            self.micros() + REDIS_RETRY.as_micros() as u64,
            Ordering::Relaxed,
        );
    }

    /// `<prefix>ratelimit:<rest>`.
    pub(super) fn key(&self, rest: &str) -> String {
        format!("{}ratelimit:{rest}", self.inner.prefix)
    }

    /// How many instances share a budget while limiting locally.
    pub(super) fn instances(&self) -> u64 {
        self.inner.cache.live_instances().max(1) as u64
    }

    pub(super) fn login_local(&self) -> std::sync::MutexGuard<'_, LoginLocal> {
        self.inner.login.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request of `class` by `key` against `limit`.
    pub async fn check(&self, class: &str, key: &str, limit: RateLimit) -> Decision {
        let full = self.key(&format!("{class}:{key}"));
        let interval = (limit.period.as_micros() as u64 / limit.count as u64).max(1);
        if let Some(redis) = self.shared() {
            let mut invocation = self.inner.script.prepare_invoke();
            invocation.key(&full).arg(interval).arg(limit.count);
            match redis.invoke::<Vec<i64>>(&invocation).await {
                Ok(reply) if reply.len() == 4 => {
                    return Decision {
                        allowed: reply[0] == 1,
                        limit: limit.count,
                        remaining: reply[1].max(0) as u32,
                        reset: Duration::from_micros(reply[2].max(0) as u64),
                        retry_after: Duration::from_micros(reply[3].max(0) as u64),
                        local: false,
                    };
                }
                Ok(reply) => {
                    tracing::warn!(
                        ?reply,
                        "unexpected rate-limit script reply; limiting locally"
                    );
                }
                Err(err) => {
                    tracing::warn!(error = %err, "Redis unavailable for rate limiting; limiting locally");
                }
            }
            self.redis_failed();
        }
        if let Some(db) = self.postgres() {
            let tau = interval.saturating_mul(u64::from(limit.count));
            match self.check_postgres(db, &full, interval, tau).await {
                Ok((admitted, before, now)) => {
                    return postgres_decision(admitted, before, now, interval, tau, limit.count);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "PostgreSQL unavailable for rate limiting; limiting locally");
                    self.redis_failed();
                }
            }
        }
        self.check_local(&full, interval, limit.count)
    }

    /// PostgreSQL (unified mode), unless it failed within the last [`REDIS_RETRY`].
    fn postgres(&self) -> Option<&Db> {
        self.inner
            .postgres
            .as_ref()
            .filter(|_| self.micros() >= self.inner.skip_redis_until.load(Ordering::Relaxed))
    }

    /// Runs [`GCRA_SQL`]: (the new TAT if admitted, the TAT before, now), microseconds.
    async fn check_postgres(
        &self,
        db: &Db,
        key: &str,
        interval: u64,
        tau: u64,
    ) -> Result<(Option<i64>, Option<i64>, i64), crate::db::DbError> {
        let conn = db.conn().await?;
        let statement = conn.prepare_cached(GCRA_SQL).await?;
        let row = conn
            .query_one(&statement, &[&key, &(interval as i64), &(tau as i64)])
            .await?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// GCRA in process with `1/n` of the budget: `n` times the interval, `1/n` of the burst.
    fn check_local(&self, key: &str, interval: u64, burst: u32) -> Decision {
        let n = self.instances();
        let interval = interval * n;
        let burst = (burst as u64 / n).max(1);
        let tau = interval * burst;
        let now = self.micros();
        let mut table = self.inner.local.lock().unwrap_or_else(|p| p.into_inner());
        // The entry expires at its TAT: past it, the key's whole burst is available again.
        let tat = table.get(key, now).copied().unwrap_or(0).max(now);
        let new_tat = tat + interval;
        let ahead = new_tat - now;
        if ahead > tau {
            return Decision {
                allowed: false,
                limit: burst as u32,
                remaining: 0,
                reset: Duration::from_micros(tat - now),
                retry_after: Duration::from_micros(ahead - tau),
                local: true,
            };
        }
        table.insert(key, new_tat, new_tat, now);
        Decision {
            allowed: true,
            limit: burst as u32,
            remaining: ((tau - ahead) / interval) as u32,
            reset: Duration::from_micros(ahead),
            retry_after: Duration::ZERO,
            local: true,
        }
    }
}

/// The verdict from [`GCRA_SQL`]'s answer, as the Lua script's reply would have given it.
fn postgres_decision(
    admitted: Option<i64>,
    before: Option<i64>,
    now: i64,
    interval: u64,
    tau: u64,
    count: u32,
) -> Decision {
    let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
    let (interval, tau) = (interval as i64, tau as i64);
    match admitted {
        Some(tat) => {
            let ahead = tat - now;
            Decision {
                allowed: true,
                limit: count,
                remaining: ((tau - ahead).max(0) / interval.max(1)) as u32,
                reset: micros(ahead),
                retry_after: Duration::ZERO,
                local: false,
            }
        }
        None => {
            let tat = before.unwrap_or(now).max(now);
            Decision {
                allowed: false,
                limit: count,
                remaining: 0,
                reset: micros(tat - now),
                retry_after: micros(tat + interval - now - tau),
                local: false,
            }
        }
    }
}

/// The rate-limit key of a client address: an IPv4 address as it is; an IPv6 address by its
/// /64 (`2001:db8:1:2::/64`), the smallest block a site is given and can rotate through
/// freely; an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, a dual-stack listener's view of
/// an IPv4 client) as the IPv4 address.
pub fn client_network(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::{Backend, EngineOptions};
    use crate::config::{CacheBackend, CacheConfig};

    /// An in-process cache engine for limiter tests (no Redis).
    pub(crate) fn memory_cache() -> Cache {
        let config = CacheConfig {
            backend: CacheBackend::Memory,
            ttls: Default::default(),
            key_names: Default::default(),
            default_ttl: Duration::from_secs(60),
            cleanup_interval: Duration::from_secs(60),
            key_prefix: "test:".into(),
            early_refresh: Default::default(),
            speculative_loads: true,
            memory_bytes: crate::config::DEFAULT_MEMORY_BYTES,
        };
        Cache::new(config, Backend::Memory, EngineOptions::default())
    }

    #[tokio::test]
    async fn local_gcra_admits_the_burst_then_one_per_interval() {
        let limiter = RateLimiter::new(None, memory_cache(), "test:");
        let limit = RateLimit {
            count: 3,
            period: Duration::from_secs(3600),
        };
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let d = limiter.check("login", "alice", limit).await;
            assert!(d.allowed && d.local);
            remaining.push(d.remaining);
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        let denied = limiter.check("login", "alice", limit).await;
        assert!(!denied.allowed);
        // One token comes back every 20 minutes.
        let wait = denied.retry_after.as_secs();
        assert!((1190..=1200).contains(&wait), "{wait}");
        // Another key has its own budget.
        assert!(limiter.check("login", "bob", limit).await.allowed);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_as_ipv4() {
        let net = |s: &str| client_network(s.parse().unwrap());
        assert_eq!(net("192.0.2.7"), "192.0.2.7");
        assert_eq!(net("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(net("2001:db8:1:2::1"), "2001:db8:1:2::/64");
        assert_eq!(
            net("2001:db8:1:2:ffff:ffff:ffff:fffe"),
            "2001:db8:1:2::/64",
            "one /64 is one client"
        );
        assert_ne!(net("2001:db8:1:3::1"), net("2001:db8:1:2::1"));
        assert_eq!(net("::1"), "::/64");
    }

    #[tokio::test]
    async fn a_local_check_costs_o1_amortised_however_many_keys_are_live() {
        let limiter = RateLimiter::new(None, memory_cache(), "test:");
        let limit = RateLimit {
            count: 5,
            period: Duration::from_secs(3600),
        };
        // 150,000 clients each leave a key that stays live for the hour.
        let n = 150_000u64;
        for i in 0..n {
            let d = limiter.check("api", &format!("user:{i}"), limit).await;
            assert!(d.allowed);
        }
        let table = limiter.inner.local.lock().unwrap();
        assert_eq!(table.len(), n as usize);
        // The old table rescanned every key on every check past 100,000 (5 * 10^9 visits
        // here); pruning when the table has doubled visits each key about twice.
        assert!(
            table.scanned() <= 2 * n,
            "{} entries scanned for {n} checks",
            table.scanned()
        );
    }
}
