//! The platform's handles every handler receives: cheap to clone, a bundle of `Arc`s.

use std::sync::Arc;
use std::time::Instant;

use cascade_core::cache::Cache;
use cascade_core::config::{CacheBackend, Config};
use cascade_core::db::Db;
use cascade_core::events::Events;
use cascade_core::identity::{Identity, RateLimiter};
use cascade_core::redis::Redis;
use cascade_core::tasks::Detached;

/// Most writes and revocations in flight at once, per instance. Past it, new ones wait for a
/// place (within `REQUEST_TIMEOUT`): clients that send writes and hang up cannot pile work up.
const DETACHED_MAX: usize = 256;

/// One of each: one pool, one Redis client, one cache engine, one configuration, built once by
/// the server's `Application` and passed down. Modules never open their own connections; a
/// module's own state wraps this one (and implements `FromRef` to it, for [`CurrentUser`]).
///
/// [`CurrentUser`]: crate::CurrentUser
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    /// None when no `REDIS_URL` is configured.
    pub redis: Option<Redis>,
    /// The one cache engine: every module reads and invalidates through it.
    pub cache: Cache,
    /// Accounts, sessions and tokens.
    pub identity: Identity,
    /// Rate limits, shared through Redis (local when Redis is unavailable).
    pub limiter: RateLimiter,
    /// Domain events to and from every instance; the application runs its listener.
    pub events: Events,
    /// Work that must finish even if its client hangs up (writes, revocations); the
    /// application waits for it when it stops.
    pub detached: Detached,
    pub started: Instant,
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        db: Db,
        redis: Option<Redis>,
        cache: Cache,
        started: Instant,
    ) -> Self {
        let detached = Detached::new(DETACHED_MAX);
        let identity = Identity::new(&config, db.clone(), cache.clone(), detached.clone());
        let prefix = &config.cache.key_prefix;
        // Unified mode: PostgreSQL is the only shared store the limits can use.
        let limiter = match (&redis, config.cache.backend) {
            (None, CacheBackend::Postgres) => {
                RateLimiter::on_postgres(db.clone(), cache.clone(), prefix)
            }
            _ => RateLimiter::new(redis.clone(), cache.clone(), prefix),
        };
        let events = Events::new(redis.clone(), db.clone(), &config.cache.key_prefix);
        identity.announce_revocations(events.clone());
        AppState {
            config,
            db,
            redis,
            cache,
            identity,
            limiter,
            events,
            detached,
            started,
        }
    }
}
