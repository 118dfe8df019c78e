//! Cache keys and tags of the catalog, and which entries each write removes.
//!
//! | entry | namespace : key (seed 003 name) | tags |
//! |---|---|---|
//! | asset details | `assets:<versionId>` (`cache:asset:<versionId>`) | — (removed by key) |
//! | a listings page | `listings:<canonical query>` (`cache:listings:<params>`) | — (namespace) |
//! | a search of assets | `asset_search:<limit>:<text>` (`GET /search`) | — (namespace) |
//! | a bundle's versions | `bundle_members:<versionId>:<depth>` | `tree:<versionId>` |
//! | a bundle | `bundles:<versionId>:<depth>` (`bundle:<versionId>:<depth>`) | `tree:<versionId>`, and `shows:<v>` for each version `v` it shows (or `shows:*` past [`MAX_SHOWN`]) |
//! | readiness | `ready:<versionId>` | `tree:<versionId>` |
//!
//! Tags must be known before the load: the engine enters a key in its tag sets when it grants
//! the lease, which is what makes an invalidation during the load refuse the fill.
//!
//! **Structure** (whether versions exist, their lineage, their rights): an answer for `d`
//! depends on `d` and its ancestors, which are only known after the load. So that dependency
//! is resolved on the write side: a write that changes version `x`'s presence or lineage
//! affects exactly the answers of `x` and of `x`'s descendants, which the write looks up after
//! it commits and invalidates by their `tree:` tags (every depth of a bundle at once), as deep
//! as readiness reaches. Receipts and policies affect readiness only, so they remove the
//! `ready:` keys of the same set. A version with more than [`MAX_EXACT`] descendants falls
//! back to removing the whole `bundles`/`bundle_members`/`ready` namespaces: still correct,
//! one call instead of thousands.
//!
//! **Content** (a version's name and metadata, `PATCH`): shown by the bundles of its
//! descendants. Walking the descendants on every `PATCH` cost PostgreSQL more than the update
//! itself (0.86 ms against 0.41 ms per write, most writes reaching the walk's cap in the
//! benchmark's catalog). So the dependency is resolved on the read side instead: a bundle's
//! versions are read first (their own entry, `bundle_members`, structure-tagged as above), and
//! the bundle is cached under a `shows:<v>` tag for each, known before its load. A `PATCH` of
//! `x` removes `shows:x`: no walk. The load reads the versions again with the bundle, in the
//! same statement; if they differ from the ones its tags came from (its lineage changed
//! meanwhile), the bundle is answered but not cached, since a tag it needs may be missing.
//!
//! Each function here says what a write made stale (the descendants looked up after the commit,
//! on the write's connection); the write removes all of it in one `invalidate_batch` call: one
//! shared-tier script and one bus message, which the engine shares with concurrent writers'
//! (`cache/batcher.rs` in core).

use cascade_core::cache::Invalidations;
use cascade_core::db::Conn as Object;

use crate::CatalogState;
use crate::queries::{self, READY_MAX_DEPTH};

pub use crate::config::{ASSET_SEARCH, ASSETS, BUNDLE_MEMBERS, BUNDLES, LISTINGS, READY};

/// Most descendants invalidated one by one; beyond, whole namespaces are.
pub const MAX_EXACT: usize = 256;

/// Most versions a cached bundle is tagged with one by one; a bundle showing more is tagged
/// `shows:*`, which every `PATCH` removes.
pub const MAX_SHOWN: usize = 256;

pub fn tree_tag(version: &str) -> String {
    format!("tree:{version}")
}

/// The tag of the bundles that show `version`'s content.
pub fn shows_tag(version: &str) -> String {
    format!("shows:{version}")
}

/// The tags of a bundle of `version` that shows `members` (sorted, `version` among them).
pub fn bundle_tags(version: &str, members: &[String]) -> Vec<String> {
    let mut tags = Vec::with_capacity(members.len().min(MAX_SHOWN) + 1);
    tags.push(tree_tag(version));
    if members.len() <= MAX_SHOWN {
        tags.extend(members.iter().map(|v| shows_tag(v)));
    } else {
        tags.push(shows_tag("*"));
    }
    tags
}

pub fn bundle_key(version: &str, depth: i32) -> String {
    format!("{version}:{depth}")
}

/// How far below a changed version the change shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only what its row says (name, metadata): the bundles that show it (tagged `shows:`).
    /// Readiness does not depend on it.
    Content,
    /// Whether it exists, its lineage, its rights: bundles and readiness, `READY_MAX_DEPTH`
    /// (deeper than a bundle reaches) below.
    Presence,
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
    match reach {
        Reach::Content => {
            let shown = versions.iter().map(|v| shows_tag(v));
            stale.tags(shown.chain([shows_tag("*")]));
        }
        Reach::Presence => tree_changed(state, conn, &mut stale, versions).await,
    }
    stale
}

/// After new edges into `children`: the bundles and readiness of them and their descendants.
pub async fn lineage_changed(
    state: &CatalogState,
    conn: &Object,
    children: &[&str],
) -> Invalidations {
    let mut stale = Invalidations::new();
    tree_changed(state, conn, &mut stale, children).await;
    stale
}

/// Adds to `stale` the bundles and readiness of `children` and their descendants.
async fn tree_changed(
    state: &CatalogState,
    conn: &Object,
    stale: &mut Invalidations,
    children: &[&str],
) {
    if children.is_empty() {
        return;
    }
    match affected(state, conn, children).await {
        Some(versions) => stale.tags(versions.iter().map(|v| tree_tag(v))),
        None => stale
            .namespace(BUNDLE_MEMBERS)
            .namespace(BUNDLES)
            .namespace(READY),
    };
}

/// After a receipt or policy of `version` was added: readiness of it and its descendants.
pub async fn rights_changed(state: &CatalogState, conn: &Object, version: &str) -> Invalidations {
    let mut stale = Invalidations::new();
    match affected(state, conn, &[version]).await {
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
async fn affected(state: &CatalogState, conn: &Object, versions: &[&str]) -> Option<Vec<String>> {
    let depth = READY_MAX_DEPTH;
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
