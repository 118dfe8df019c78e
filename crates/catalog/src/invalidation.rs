//! Cache keys and tags of the catalog, and which entries each write removes.
//!
//! | entry | namespace : key (seed 003 name) | tags |
//! |---|---|---|
//! | asset details | `assets:<versionId>` (`cache:asset:<versionId>`) | — (removed by key) |
//! | a listings page | `listings:<canonical query>` (`cache:listings:<params>`) | — (namespace) |
//! | a search of assets | `asset_search:<limit>:<text>` (`GET /search`) | — (namespace) |
//! | a bundle | `bundles:<versionId>:<depth>` (`bundle:<versionId>:<depth>`) | `tree:<versionId>` |
//! | readiness | `ready:<versionId>` | `tree:<versionId>` |
//!
//! A bundle or readiness answer for `d` depends on `d` and its ancestors. Tags must be known
//! before the load (the engine enters a key in its tag sets when it grants the lease, which is
//! what makes an invalidation during the load refuse the fill), and `d`'s ancestors are only
//! known after it. So the dependency is resolved on the write side instead: a write that
//! changes version `x` (its row, or new edges into it) affects exactly the answers of `x` and
//! of `x`'s descendants, which the write looks up after it commits and invalidates by their
//! `tree:` tags (every depth of a bundle at once), as far down as the change shows
//! ([`Reach`]: a rename only as deep as a bundle reaches). Receipts and policies affect readiness
//! only, so they remove the `ready:` keys of the same set. A version with more than
//! [`MAX_EXACT`] descendants falls back to removing the whole `bundles`/`ready` namespaces:
//! still correct, one call instead of thousands.
//!
//! Each function here says what a write made stale (the descendants looked up after the commit,
//! on the write's connection); the write removes all of it in one `invalidate_batch` call: one
//! shared-tier script and one bus message, which the engine shares with concurrent writers'
//! (`cache/batcher.rs` in core).

use cascade_core::cache::Invalidations;
use cascade_core::db::Conn as Object;

use crate::CatalogState;
use crate::queries::{self, BUNDLE_MAX_DEPTH, READY_MAX_DEPTH};

pub use crate::config::{ASSET_SEARCH, ASSETS, BUNDLES, LISTINGS, READY};

/// Most descendants invalidated one by one; beyond, whole namespaces are.
pub const MAX_EXACT: usize = 256;

pub fn tree_tag(version: &str) -> String {
    format!("tree:{version}")
}

pub fn bundle_key(version: &str, depth: i32) -> String {
    format!("{version}:{depth}")
}

/// How far below a changed version the change shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only what its row says (name, metadata): the bundles that show it, at most
    /// `BUNDLE_MAX_DEPTH` levels below. Readiness does not depend on it.
    Content,
    /// Whether it exists, its lineage, its rights: readiness too, `READY_MAX_DEPTH` below.
    Presence,
}

impl Reach {
    fn depth(self) -> i32 {
        match self {
            Reach::Content => BUNDLE_MAX_DEPTH,
            Reach::Presence => READY_MAX_DEPTH,
        }
    }
}

/// After asset rows changed: their details, every listing page and search, and the bundles (and, when
/// they were created or deleted, the readiness) of them and their descendants.
pub async fn assets_changed(
    state: &CatalogState,
    conn: &Object,
    versions: &[&str],
    reach: Reach,
) -> Invalidations {
    let mut stale = Invalidations::new();
    stale
        .keys(ASSETS, versions)
        .namespace(LISTINGS)
        .namespace(ASSET_SEARCH);
    tree_changed(state, conn, &mut stale, versions, reach).await;
    stale
}

/// After new edges into `children`: the bundles and readiness of them and their descendants.
pub async fn lineage_changed(
    state: &CatalogState,
    conn: &Object,
    children: &[&str],
) -> Invalidations {
    let mut stale = Invalidations::new();
    tree_changed(state, conn, &mut stale, children, Reach::Presence).await;
    stale
}

/// Adds to `stale` the bundles and readiness of `children` and their descendants.
async fn tree_changed(
    state: &CatalogState,
    conn: &Object,
    stale: &mut Invalidations,
    children: &[&str],
    reach: Reach,
) {
    if children.is_empty() {
        return;
    }
    match affected(state, conn, children, reach).await {
        Some(versions) => stale.tags(versions.iter().map(|v| tree_tag(v))),
        None => stale.namespace(BUNDLES).namespace(READY),
    };
}

/// After a receipt or policy of `version` was added: readiness of it and its descendants.
pub async fn rights_changed(state: &CatalogState, conn: &Object, version: &str) -> Invalidations {
    let mut stale = Invalidations::new();
    match affected(state, conn, &[version], Reach::Presence).await {
        Some(versions) => {
            let keys: Vec<&str> = versions.iter().map(String::as_str).collect();
            stale.keys(READY, &keys)
        }
        None => stale.namespace(READY),
    };
    stale
}

/// `versions` and their descendants, looked up after the write committed (so a concurrent
/// write's new edges are either seen here or invalidated by that write after its own commit),
/// on the write's own connection (a second pool connection per write cost more than the
/// query: ~12 ms waiting for the pool under 64 writers), or on a fresh one if that failed (it
/// may have died in the commit). `None` when there are too many, or when PostgreSQL cannot
/// answer: the write is committed either way, so the caller then removes whole namespaces
/// rather than leave a stale entry.
async fn affected(
    state: &CatalogState,
    conn: &Object,
    versions: &[&str],
    reach: Reach,
) -> Option<Vec<String>> {
    let depth = reach.depth();
    let found = match queries::descendants(conn, versions, depth, MAX_EXACT).await {
        Ok(found) => Ok(found),
        Err(_) => {
            async {
                let conn = state.db.conn().await?;
                queries::descendants(&conn, versions, depth, MAX_EXACT).await
            }
            .await
        }
    };
    match found {
        Ok(found) => found,
        Err(err) => {
            tracing::warn!(error = %err, "descendants lookup failed; invalidating whole namespaces");
            None
        }
    }
}
