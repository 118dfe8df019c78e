//! The state every handler receives: cheap to clone, a bundle of `Arc`s.

use std::sync::Arc;
use std::time::Instant;

use cascade_core::cache::Cache;
use cascade_core::config::Config;
use cascade_core::db::Db;
use cascade_core::redis::Redis;

/// One of each: one pool, one Redis client, one cache engine, one configuration, built in `main` and passed
/// down. Modules never open their own connections.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    /// None when no `REDIS_URL` is configured.
    pub redis: Option<Redis>,
    /// The one cache engine: every module reads and invalidates through it.
    pub cache: Cache,
    pub started: Instant,
}
