//! The catalog's writes. Each needs an authenticated caller (401), validates its input
//! completely before touching PostgreSQL, checks in the same transaction that the caller owns
//! the producer concerned (403; the account that registered a producer owns it), and after
//! the commit removes exactly the cache entries it made stale (see `invalidation.rs`) before
//! it answers: the next read anywhere sees the write.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::CatalogState;
use crate::http_cache::json;
use crate::invalidation::{self as inv, Reach};
use crate::model::{AssetChange, Body, NewAsset, NewPolicy, NewProducer, NewReceipt, VersionId};
use crate::openlineage::RunEvent;
use crate::queries::{self, internal};
use cascade_http::ApiError;
use cascade_http::CurrentUser;

/// `in_transaction!(state, |tx| write, |result| after)`: runs `write` in a transaction on a
/// pool connection, commits it, then runs `after` (the write's invalidations) with the
/// write's result bound to `result`. `after` also runs when the commit fails: the connection
/// may have died after PostgreSQL committed, and removing entries that did not go stale costs
/// a reload, while keeping ones that did would serve the old value until their TTL.
macro_rules! in_transaction {
    ($state:expr, |$tx:ident| $write:expr, |$done:ident| $after:expr) => {{
        let mut conn = $state.db.conn().await?;
        let $tx = conn.transaction().await.map_err(internal)?;
        let $done = $write;
        let committed = $tx.commit().await;
        // The connection goes back to the pool before the invalidations, which wait for
        // every instance's acknowledgement: holding it meanwhile starves concurrent writers.
        drop(conn);
        $after;
        committed.map_err(internal)?;
        $done
    }};
    ($state:expr, |$tx:ident| $write:expr) => {
        in_transaction!($state, |$tx| $write, |_done| ())
    };
}

/// `POST /producers` `{"producerId", "name"}`.
pub async fn create_producer(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    body: Bytes,
) -> Result<Response, ApiError> {
    let producer = NewProducer::parse(&Body::parse(&body)?)?;
    let created = in_transaction!(state, |tx| queries::insert_producer(
        &tx,
        &producer,
        user.user_id
    )
    .await?);
    Ok(json(StatusCode::CREATED, created))
}

/// `POST /assets` `{"versionId", "producerId", "name", "metadata"?}`.
pub async fn create_asset(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    body: Bytes,
) -> Result<Response, ApiError> {
    let asset = NewAsset::parse(&Body::parse(&body)?)?;
    // A new version can complete lineage that named it before it existed.
    let created = in_transaction!(
        state,
        |tx| {
            queries::authorize_producer(&tx, asset.producer_id.as_str(), user.user_id).await?;
            queries::insert_asset(&tx, &asset).await?
        },
        |_created| inv::assets_changed(&state, &[asset.version_id.as_str()], Reach::Presence).await
    );
    Ok(json(StatusCode::CREATED, created))
}

/// `PATCH /listings/:versionId` `{"name"?, "metadata"?}` (metadata is replaced, not merged).
pub async fn update_asset(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    Path(version): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let version = VersionId::parse("versionId", &version)?;
    let change = AssetChange::parse(&Body::parse(&body)?)?;
    let updated = in_transaction!(
        state,
        |tx| queries::update_asset(&tx, &version, user.user_id, &change).await?,
        |_updated| inv::assets_changed(&state, &[version.as_str()], Reach::Content).await
    );
    Ok(json(StatusCode::OK, updated))
}

/// `DELETE /listings/:versionId`: the asset goes, with its receipts and policies; lineage
/// naming it stays (readiness of its descendants then reports it missing).
pub async fn delete_asset(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let version = VersionId::parse("versionId", &version)?;
    in_transaction!(
        state,
        |tx| queries::delete_asset(&tx, &version, user.user_id).await?,
        |_done| inv::assets_changed(&state, &[version.as_str()], Reach::Presence).await
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /policies` `{"versionId", "document", "expiresAt"?}`.
pub async fn create_policy(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    body: Bytes,
) -> Result<Response, ApiError> {
    let policy = NewPolicy::parse(&Body::parse(&body)?)?;
    let created = in_transaction!(
        state,
        |tx| queries::insert_policy(&tx, &policy, user.user_id).await?,
        |_created| inv::rights_changed(&state, policy.version_id.as_str()).await
    );
    Ok(json(StatusCode::CREATED, created))
}

/// `POST /receipts` `{"versionId", "payer", "amount", "expiresAt"?}`.
pub async fn create_receipt(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    body: Bytes,
) -> Result<Response, ApiError> {
    let receipt = NewReceipt::parse(&Body::parse(&body)?)?;
    let created = in_transaction!(
        state,
        |tx| queries::insert_receipt(&tx, &receipt, user.user_id).await?,
        |_created| inv::rights_changed(&state, receipt.version_id.as_str()).await
    );
    Ok(json(StatusCode::CREATED, created))
}

/// `POST /lineage`: an OpenLineage run event. Answers the event id and the edges it added.
/// An edge into a version changes what its bundle and readiness say, which is its owner's to
/// say: an output that gains edges and is an asset must be one of the caller's (403
/// otherwise). Outputs not in the catalog, and inputs, may be anyone's: pipelines report
/// lineage before or without publishing. The event records who sent it.
pub async fn record_lineage(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    body: Bytes,
) -> Result<Response, ApiError> {
    let event = RunEvent::parse(Body::parse(&body)?.value())?;
    let mut outputs: Vec<&str> = event.edges.iter().map(|(_, c)| c.as_str()).collect();
    outputs.sort_unstable();
    outputs.dedup();
    let (event_id, added) = in_transaction!(
        state,
        |tx| {
            queries::authorize_outputs(&tx, &outputs, user.user_id).await?;
            queries::insert_event(&tx, &event, user.user_id).await?
        },
        |_recorded| inv::lineage_changed(&state, &outputs).await
    );
    let edges: Vec<_> = added
        .iter()
        .map(|(p, c)| serde_json::json!({"parent": p, "child": c}))
        .collect();
    let body = serde_json::json!({"eventId": event_id, "edgesAdded": edges});
    Ok(json(
        StatusCode::CREATED,
        serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.into()))?,
    ))
}
