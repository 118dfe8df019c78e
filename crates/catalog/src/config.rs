//! The catalog's settings and cache namespaces (seed 003).

use std::time::Duration;

use cascade_core::config::{Namespace, Parser};

pub const ASSETS: &str = "assets";
pub const LISTINGS: &str = "listings";
pub const BUNDLES: &str = "bundles";
/// The versions each cached bundle shows (`invalidation.rs`).
pub const BUNDLE_MEMBERS: &str = "bundle_members";
pub const READY: &str = "ready";
/// `GET /search`'s answers of assets: `all:<limit>:<text>`; every asset write removes the
/// namespace, as it does `listings`.
pub const ASSET_SEARCH: &str = "asset_search";

/// The catalog's settings, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawCatalogConfig {
    /// Whether lineage bundles use the shared (Redis) tier [default: true].
    #[arg(long, env = "USE_REDIS_BUNDLES", global = true)]
    pub use_redis_bundles: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// Bundles are cached in the shared tier too (seed 003's `USE_REDIS_BUNDLES`); when false
    /// they are computed on every request.
    pub use_redis_bundles: bool,
}

impl CatalogConfig {
    pub fn parse(p: &mut Parser, raw: &RawCatalogConfig) -> CatalogConfig {
        CatalogConfig {
            use_redis_bundles: p.boolean("USE_REDIS_BUNDLES", &raw.use_redis_bundles, true),
        }
    }

    /// Rows for `cascade config`.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![("USE_REDIS_BUNDLES", self.use_redis_bundles.to_string())]
    }

    /// The catalog's cache namespaces with seed 003's TTLs and key names (its D022HR keyspace:
    /// `cache:asset:<versionId>`, `cache:listings:<params>`, `bundle:<versionId>:<depth>`,
    /// `ol:cache:lineage:…`). `ready` has no seed TTL and follows `CACHE_DEFAULT_TTL`.
    pub fn namespaces(&self) -> Vec<Namespace> {
        let s = Duration::from_secs;
        vec![
            Namespace::new(ASSETS, s(300)).keyed("cache:asset"),
            Namespace::new(LISTINGS, s(180)).keyed("cache:listings"),
            Namespace::new(BUNDLES, s(60)).keyed("bundle"),
            Namespace::new(BUNDLE_MEMBERS, s(60)),
            Namespace::new("lineage", s(120)).keyed("ol:cache:lineage"),
            Namespace::new("headers", s(60)),
            Namespace::new("policies", s(600)),
            Namespace::new("prices", s(120)),
            Namespace::default_ttl(READY),
            // Brief: a search is cheap to redo, and the space of texts is large.
            Namespace::new(ASSET_SEARCH, s(30)),
        ]
    }
}
