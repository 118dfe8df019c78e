//! The shared tier behind the engine: Redis by default, PostgreSQL in unified mode. Both speak
//! the same lease protocol; this enum only dispatches.

use std::time::{Duration, Instant};

use super::pg_tier::PgTier;
use super::redis_tier::{Fresh, Lookup, RedisTier};

/// A shared-tier failure; the engine treats every kind the same (breaker, read-through),
/// except that a call that timed out is not tried again at once (`deliver`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct TierError {
    message: String,
    timed_out: bool,
}

impl TierError {
    /// The call spent its whole deadline without an answer.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }
}

impl From<crate::redis::RedisError> for TierError {
    fn from(err: crate::redis::RedisError) -> Self {
        TierError {
            // Ours, or the connection's own response timeout (the same duration): either
            // may fire first.
            timed_out: match &err {
                crate::redis::RedisError::Timeout(_) => true,
                crate::redis::RedisError::Command(err) => err.is_timeout(),
                crate::redis::RedisError::Config(_) => false,
            },
            message: err.to_string(),
        }
    }
}

impl From<crate::db::DbError> for TierError {
    fn from(err: crate::db::DbError) -> Self {
        TierError {
            message: err.to_string(),
            timed_out: false,
        }
    }
}

/// One lease holder's store in [`SharedTier::store_leased`].
pub(crate) struct LeasedStore<'a> {
    pub full_key: &'a str,
    /// What the value carries (the PostgreSQL tier stores them; Redis indexed them with the
    /// lease).
    pub tags: &'a [String],
    pub token: &'a str,
    /// The TTL the lease was taken with.
    pub lease_ttl: Duration,
    /// The stored form of the value.
    pub bytes: Vec<u8>,
    /// The value's TTL, counted from the lease's grant.
    pub ttl: Duration,
}

/// A speculative load's store in [`SharedTier::store_fresh`] (`lease.rs`): no lease, a
/// deadline instead.
pub(crate) struct FreshStore<'a> {
    pub full_key: &'a str,
    /// Entered in their sets with the value (the namespace's among them).
    pub tags: &'a [String],
    /// The stored form of the value.
    pub bytes: Vec<u8>,
    /// The value's TTL from the store.
    pub ttl: Duration,
    /// When the load began: the store may run until `window` after that, by Redis's clock.
    pub began: Instant,
    pub window: Duration,
}

pub(crate) enum SharedTier {
    /// Boxed: the scripts make it much larger than the PostgreSQL variant.
    Redis(Box<RedisTier>),
    Postgres(PgTier),
}

impl SharedTier {
    /// The longest after a speculative load began that its store may run and still be taken
    /// (`lease.rs`): `wanted` (`EngineOptions::speculation_window`), within half the
    /// tombstones' life, and under half of `REDIS_TIMEOUT`, so that a Redis that stalled long
    /// enough to fail another instance's invalidation (which then left no tombstone) runs the
    /// store too late for any load begun before that invalidation to be stored. `None`: this tier keeps
    /// no tombstones (PostgreSQL), so nothing loads speculatively.
    pub fn speculation_window(&self, wanted: Duration) -> Option<Duration> {
        match self {
            SharedTier::Redis(t) => {
                Some(wanted.min(t.timeout() / 2).min(super::redis_tier::TOMB / 2))
            }
            SharedTier::Postgres(_) => None,
        }
    }

    /// `value_ttl`: the longest TTL the lease holder's fill may store. `probe_first`: hits are
    /// likely, a plain read first may save work (the PostgreSQL tier's lookup is one statement
    /// either way). `batched`: a batched read's, sent in one script with the concurrent ones
    /// on Redis (`lookup_batch.rs`).
    #[allow(clippy::too_many_arguments)]
    pub async fn lookup(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
        value_ttl: Duration,
        probe_first: bool,
        batched: bool,
    ) -> Result<Lookup, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => {
                t.lookup(
                    full_key,
                    tags,
                    token,
                    lease_ttl,
                    value_ttl,
                    probe_first,
                    batched,
                )
                .await?
            }
            SharedTier::Postgres(t) => t.lookup(full_key, tags, token, lease_ttl).await?,
        })
    }

    pub async fn try_lease(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
        value_ttl: Duration,
    ) -> Result<bool, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => {
                t.try_lease(full_key, tags, token, lease_ttl, value_ttl)
                    .await?
            }
            SharedTier::Postgres(t) => t.try_lease(full_key, tags, token, lease_ttl).await?,
        })
    }

    /// Gives back the lease `token` holds on `full_key` (its load failed); whether it did.
    pub async fn release(&self, full_key: &str, token: &str) -> Result<bool, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => t.release(full_key, token).await?,
            SharedTier::Postgres(t) => t.release(full_key, token).await?,
        })
    }

    /// A read without a lease. `tags`: the value's (its namespace's at least), which Redis
    /// must still list it under for it to be served ([`RedisTier::get`]).
    pub async fn get(&self, full_key: &str, tags: &[String]) -> Result<Option<Vec<u8>>, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => t.get(full_key, tags).await?,
            SharedTier::Postgres(t) => t.get(full_key).await?,
        })
    }

    /// `lease`: the lease's token and the TTL it was taken with.
    pub async fn store(
        &self,
        full_key: &str,
        lease: Option<(&str, Duration)>,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
    ) -> Result<bool, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => t.store(full_key, lease, bytes, ttl, tags).await?,
            SharedTier::Postgres(t) => {
                let token = lease.map(|(token, _)| token);
                t.store(full_key, token, bytes, ttl, tags).await?
            }
        })
    }

    /// Stores each of `stores` if its lease is still its token (as [`store`](Self::store)
    /// with a lease), in one round trip on Redis: a batch of loads fills at once. Whether
    /// each was stored, in order.
    pub async fn store_leased(&self, stores: &[LeasedStore<'_>]) -> Result<Vec<bool>, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => t.store_leased(stores).await?,
            SharedTier::Postgres(t) => {
                let mut stored = Vec::with_capacity(stores.len());
                for s in stores {
                    stored.push(
                        t.store(s.full_key, Some(s.token), &s.bytes, s.ttl, s.tags)
                            .await?,
                    );
                }
                stored
            }
        })
    }

    /// Speculative loads' stores (see [`FreshStore`]): only on Redis, the one tier that keeps
    /// tombstones (`speculation_window` is `None` on the other, which stores nothing here).
    pub async fn store_fresh(&self, stores: &[FreshStore<'_>]) -> Result<Vec<Fresh>, TierError> {
        Ok(match self {
            SharedTier::Redis(t) => t.store_fresh(stores).await?,
            SharedTier::Postgres(_) => stores.iter().map(|_| Fresh::Late).collect(),
        })
    }

    /// Deletes the values (and leases) of `full_keys` and of every key carrying any of `tags`:
    /// one script on Redis when the tags list few keys; on PostgreSQL, leases before entries
    /// (`pg_tier.rs`).
    pub async fn invalidate(&self, full_keys: &[String], tags: &[String]) -> Result<(), TierError> {
        match self {
            SharedTier::Redis(t) => {
                t.invalidate(full_keys, tags).await?;
            }
            SharedTier::Postgres(t) => {
                if !full_keys.is_empty() {
                    t.invalidate_keys(full_keys).await?;
                }
                if !tags.is_empty() {
                    t.invalidate_tags(tags).await?;
                }
            }
        }
        Ok(())
    }
}
