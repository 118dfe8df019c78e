//! The catalog's reads, each cache-aside in its namespace (keys and tags: `invalidation.rs`).
//! Loads of assets and listings may read from a replica (`Db::read`: never one behind a
//! write acknowledged before the load began); bundles and readiness read the primary.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::CatalogState;
use crate::error::CatalogError;
use crate::http_cache::{self, IfNoneMatch, respond};
use crate::invalidation::{self as inv, ASSETS, BUNDLE_MEMBERS, BUNDLES, LISTINGS, READY};
use crate::listing::{ListingParams, ListingQuery};
use crate::model::VersionId;
use crate::queries::{self, BUNDLE_MAX_DEPTH};
use cascade_core::cache::CachedBody;
use cascade_http::{ApiError, FastRoute};

/// Default `depth` of `GET /bundle`.
pub const DEFAULT_BUNDLE_DEPTH: i32 = 3;

/// `get_or_load_body` with a loader that takes a pool connection; a hit clones nothing of the
/// state.
async fn cached<F, Fut>(
    state: &CatalogState,
    namespace: &str,
    key: &str,
    tags: &[String],
    load: F,
) -> Result<Option<CachedBody>, CatalogError>
where
    F: FnOnce(CatalogState) -> Fut,
    Fut: Future<Output = Result<Option<Vec<u8>>, CatalogError>>,
{
    let (body, _) = state
        .cache
        .get_or_load_body(namespace, key, tags, || load(state.clone()))
        .await?;
    Ok(body)
}

fn not_found(version: &VersionId) -> ApiError {
    ApiError::NotFound(format!(
        "asset version {:?} does not exist",
        version.as_str()
    ))
}

/// The template of `GET /listings/{version_id}`.
pub const ASSET_PATH: &str = "/listings/{version_id}";

/// `GET /listings/:versionId`.
#[utoipa::path(get, path = "/listings/{version_id}", tag = "catalog", params(crate::openapi::VersionPath),
    responses((status = 200, body = crate::openapi::Asset, headers(("ETag" = String))), (status = 304, description = "Not modified (`If-None-Match`)"), (status = 404, description = "No such asset"))
)]
pub async fn asset(
    State(state): State<CatalogState>,
    Path(version): Path<String>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    asset_answer(state, version, if_none_match).await
}

/// `GET /listings/{version_id}` as the edge serves it past the router ([`FastRoute`]): the
/// same answer as [`asset`]'s from the same parameter and `If-None-Match`.
pub fn asset_fast(state: CatalogState) -> FastRoute {
    FastRoute::new(ASSET_PATH, move |version, headers| {
        let state = state.clone();
        let (version, if_none_match) = (version.to_owned(), IfNoneMatch::from_headers(headers));
        Some(Box::pin(async move {
            asset_answer(state, version, if_none_match)
                .await
                .into_response()
        }))
    })
}

async fn asset_answer(
    state: CatalogState,
    version: String,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let version = VersionId::parse_owned("versionId", version)?;
    // Concurrent misses share one statement (`queries::assets`) and one fill round trip; the
    // statement may run on a replica that has replayed every acknowledged write (`Db::read`).
    let db = &state.db;
    let (body, _) = state
        .cache
        .get_or_load_body_batched(ASSETS, version.as_str(), &[], |versions| async move {
            let versions = &versions;
            db.read(|conn| async move { queries::assets(&conn, versions).await })
                .await
        })
        .await?;
    let body = body.ok_or_else(|| not_found(&version))?;
    Ok(respond(&if_none_match, &body, http_cache::ASSET))
}

/// `GET /listings?q=&producer=&createdAfter=&createdBefore=&limit=&cursor=`.
#[utoipa::path(get, path = "/listings", tag = "catalog", params(crate::openapi::ListingParams),
    responses((status = 200, body = crate::openapi::AssetPage, headers(("ETag" = String))), (status = 304, description = "Not modified (`If-None-Match`)"))
)]
pub async fn listings(
    State(state): State<CatalogState>,
    Query(params): Query<ListingParams>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let query = ListingQuery::parse(&params)?;
    let body = cached(&state, LISTINGS, &query.key(), &[], |state| {
        let query = query.clone();
        async move {
            let query = &query;
            (state.db)
                .read(|conn| async move { queries::listings(&conn, query).await })
                .await
                .map(Some)
        }
    })
    .await?
    .ok_or_else(|| {
        ApiError::Internal(std::io::Error::other("a listing page cannot be absent").into())
    })?;
    Ok(respond(&if_none_match, &body, http_cache::LISTINGS))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionParams {
    version_id: Option<String>,
    depth: Option<String>,
}

fn version_param(params: &VersionParams) -> Result<VersionId, ApiError> {
    let raw = params.version_id.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "versionId",
            "versionId: required query parameter is missing",
        )
    })?;
    Ok(VersionId::parse("versionId", raw)?)
}

/// `GET /bundle?versionId=&depth=` (depth 0 to 10, default 3). With `USE_REDIS_BUNDLES=false`
/// bundles bypass the cache and are assembled from PostgreSQL on every request.
#[utoipa::path(get, path = "/bundle", tag = "catalog", params(crate::openapi::BundleParams),
    responses((status = 200, body = crate::openapi::Bundle, headers(("ETag" = String))), (status = 304, description = "Not modified (`If-None-Match`)"), (status = 404, description = "No such asset"))
)]
pub async fn bundle(
    State(state): State<CatalogState>,
    Query(params): Query<VersionParams>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let version = version_param(&params)?;
    let depth = match params.depth.as_deref() {
        None => DEFAULT_BUNDLE_DEPTH,
        Some(d) => d
            .parse::<i32>()
            .ok()
            .filter(|d| (0..=BUNDLE_MAX_DEPTH).contains(d))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "depth",
                    format!("depth: expected a whole number from 0 to {BUNDLE_MAX_DEPTH}"),
                )
            })?,
    };
    let load = |state: CatalogState| {
        let version = version.clone();
        async move { queries::bundle(&state.db.conn().await?, version.as_str(), depth).await }
    };
    if !state.config.use_redis_bundles {
        let body = load(state.clone())
            .await?
            .ok_or_else(|| not_found(&version))?;
        return Ok(http_cache::respond_uncached(
            &if_none_match,
            body,
            http_cache::REVALIDATE,
        ));
    }
    let key = inv::bundle_key(version.as_str(), depth);
    // The versions it shows first: they are its tags (`invalidation.rs`, "Content").
    let tree = [inv::tree_tag(version.as_str())];
    let members: Vec<String> = state
        .cache
        .get_or_load(BUNDLE_MEMBERS, &key, &tree, || {
            let (state, version) = (state.clone(), version.clone());
            async move {
                let conn = state.db.conn().await?;
                queries::bundle_members(&conn, version.as_str(), depth)
                    .await
                    .map(Some)
            }
        })
        .await
        .map_err(|err| match err {
            cascade_core::cache::CacheError::Load(err) => ApiError::from(err),
            other => ApiError::Internal(other.into()),
        })?
        .unwrap_or_default();
    let tags = inv::bundle_tags(version.as_str(), &members);
    let loaded = state
        .cache
        .get_or_load_body(BUNDLES, &key, &tags, || {
            let (state, version) = (state.clone(), version.clone());
            async move {
                let conn = state.db.conn().await?;
                match queries::bundle_with_members(&conn, version.as_str(), depth).await? {
                    None => Ok(None),
                    Some((body, shown)) if shown == members => Ok(Some(body)),
                    // Its lineage changed since its versions were read: a tag it needs may
                    // be missing, so it is answered but not cached.
                    Some((body, _)) => Err(BundleLoad::Moved(body)),
                }
            }
        })
        .await;
    match loaded {
        Ok((body, _)) => {
            let body = body.ok_or_else(|| not_found(&version))?;
            Ok(respond(&if_none_match, &body, http_cache::REVALIDATE))
        }
        Err(BundleLoad::Moved(body)) => Ok(http_cache::respond_uncached(
            &if_none_match,
            body,
            http_cache::REVALIDATE,
        )),
        Err(BundleLoad::Failed(err)) => Err(err.into()),
    }
}

/// How a bundle's load fails to give an entry to cache.
enum BundleLoad {
    /// The bundle, whose versions are not the ones its tags were made from.
    Moved(Vec<u8>),
    Failed(CatalogError),
}

impl From<CatalogError> for BundleLoad {
    fn from(err: CatalogError) -> Self {
        BundleLoad::Failed(err)
    }
}

impl From<cascade_core::db::DbError> for BundleLoad {
    fn from(err: cascade_core::db::DbError) -> Self {
        BundleLoad::Failed(err.into())
    }
}

/// The part of a readiness answer that says how long it holds.
#[derive(Deserialize)]
struct Validity {
    #[serde(rename = "validUntilMs")]
    until_ms: Option<u64>,
}

fn expired(body: &[u8]) -> bool {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    serde_json::from_slice::<Validity>(body)
        .ok()
        .and_then(|v| v.until_ms)
        .is_some_and(|until| until <= now_ms)
}

/// `GET /ready?versionId=`. A cached answer that relied on a receipt or policy that has
/// expired since is dropped and recomputed.
#[utoipa::path(get, path = "/ready", tag = "catalog", params(crate::openapi::ReadyParams),
    responses((status = 200, body = crate::openapi::Readiness, headers(("ETag" = String))), (status = 304, description = "Not modified (`If-None-Match`)"), (status = 404, description = "No such asset"))
)]
pub async fn ready(
    State(state): State<CatalogState>,
    Query(params): Query<VersionParams>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let version = version_param(&params)?;
    let tags = [inv::tree_tag(version.as_str())];
    let load = |state: CatalogState| {
        let version = version.clone();
        async move { queries::readiness(&state.db.conn().await?, version.as_str()).await }
    };
    let mut body = cached(&state, READY, version.as_str(), &tags, load).await?;
    if body.as_ref().is_some_and(|b| expired(b.bytes())) {
        state.cache.invalidate(READY, version.as_str()).await;
        body = cached(&state, READY, version.as_str(), &tags, load).await?;
    }
    let body = body.ok_or_else(|| not_found(&version))?;
    Ok(respond(&if_none_match, &body, http_cache::REVALIDATE))
}
