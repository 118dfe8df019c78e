//! The catalog's writes. Each needs an authenticated caller (401), validates its input
//! completely before touching PostgreSQL, checks in the same transaction that the caller owns
//! the producer concerned (403; the account that registered a producer owns it), and after
//! the commit removes exactly the cache entries it made stale (see `invalidation.rs`) before
//! it answers: the next read anywhere sees the write. Bodies must be JSON (`Content-Type:
//! application/json` or `…+json`; 415 otherwise).
//!
//! Every write that changes something records it in the audit log (`cascade_core::audit`) in
//! the same transaction (the one statement of `PATCH /listings/{id}` writes its row too): the
//! account, the request id, the entity before and after. A refused write (400, 403, 404, 409)
//! leaves no row.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use cascade_core::cache::Invalidations;

use crate::CatalogState;
use crate::http_cache::json;
use crate::invalidation::{self as inv, Reach};
use crate::model::{AssetChange, Body, NewAsset, NewPolicy, NewProducer, NewReceipt, VersionId};
use crate::openlineage::RunEvent;
use crate::queries::{self, Author, internal};
use cascade_core::events::Events;
use cascade_http::ApiError;
use cascade_http::CurrentUser;
use cascade_http::JsonBody;
use serde_json::Value;

/// `in_transaction!(state, |tx| write, |result, conn| stale)`: runs `write` in a transaction on
/// a pool connection, commits it, then finds what it made stale (`stale`, an
/// [`Invalidations`], with the write's result bound to `result` and the connection to `conn`
/// for the lookups that need PostgreSQL) and removes it. The invalidations also run when the
/// commit fails: the connection may have died after PostgreSQL committed, and removing entries
/// that did not go stale costs a reload, while keeping ones that did would serve the old value
/// until their TTL.
///
/// All of it runs in the application's detached tasks (`cascade_core::tasks::Detached`), which
/// the handler awaits and shutdown waits for: a client that goes away drops
/// the handler's future, and with it anything that future was running. A write it had
/// committed (or was committing) would then keep its stale entries on every instance until
/// their TTL. The task owns what the write needs (it is `async move`), so the handler hands
/// its parsed input over.
macro_rules! in_transaction {
    ($state:expr, |$tx:ident| $write:expr, |$done:ident, $conn:ident| $stale:expr) => {{
        let db = $state.db.clone();
        let detached = $state.app.detached.clone();
        let task = detached.run(async move {
            let mut conn = db.conn().await?;
            let $tx = conn.transaction().await.map_err(internal)?;
            let $done = $write;
            let committed = $tx.commit().await;
            let stale: Invalidations = {
                let $conn = &conn;
                $stale
            };
            // The connection goes back to the pool before the invalidations, which wait for
            // every instance's acknowledgement: holding it meanwhile starves concurrent writers.
            drop(conn);
            $state.cache.invalidate_batch(&stale).await;
            committed.map_err(internal)?;
            Ok::<_, ApiError>($done)
        });
        task.await.map_err(|stopping| ApiError::Unavailable {
            message: stopping.to_string(),
            retry_after: std::time::Duration::from_secs(1),
        })??
    }};
    ($state:expr, |$tx:ident| $write:expr) => {
        in_transaction!($state, |$tx| $write, |_done, _conn| Invalidations::new())
    };
}

/// `in_statement!(state, |conn| write, |result, conn| stale)`: as `in_transaction!`, for a
/// write that is one statement, run without a transaction around it (`BEGIN` and `COMMIT` were
/// two more round trips, and two more statements for PostgreSQL to run, per write). The
/// invalidations run whatever the statement answered, an error too (the connection may have
/// died after PostgreSQL committed it), except a refusal the statement itself reported
/// (403, 404, 400, 409: nothing was written), so a user sending writes to rows that are not
/// theirs cannot make every instance drop its caches.
macro_rules! in_statement {
    ($state:expr, |$client:ident| $write:expr, |$done:ident, $conn:ident| $stale:expr) => {{
        let db = $state.db.clone();
        let detached = $state.app.detached.clone();
        let task = detached.run(async move {
            let conn = db.conn().await?;
            let $done = {
                let $client = &conn;
                async { Ok::<_, ApiError>($write) }.await
            };
            let refused = matches!(
                &$done,
                Err(ApiError::Forbidden(_)
                    | ApiError::NotFound(_)
                    | ApiError::BadRequest { .. }
                    | ApiError::Conflict(_))
            );
            let stale: Invalidations = if refused {
                Invalidations::new()
            } else {
                let $conn = &conn;
                $stale
            };
            drop(conn);
            $state.cache.invalidate_batch(&stale).await;
            $done
        });
        task.await.map_err(|stopping| ApiError::Unavailable {
            message: stopping.to_string(),
            retry_after: std::time::Duration::from_secs(1),
        })??
    }};
}

/// The caller of a write and its request (`x-request-id`), for the audit rows.
fn author(user: &cascade_core::identity::Principal, headers: &HeaderMap) -> Author {
    Author {
        actor: cascade_core::audit::user_actor(user.user_id),
        user_id: user.user_id,
        request_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

/// The id field `key` of a write's JSON answer, as text (`policyId`: a number).
fn id_in(body: &[u8], key: &str) -> Result<String, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(match &value[key] {
        Value::String(id) => id.clone(),
        other => other.to_string(),
    })
}

/// Announces a committed asset change as the domain event `asset.changed` on
/// `cascade-events` (`{"version_id", "change": created|updated|deleted}`), which the real-time
/// channels forward. After the commit and its invalidations; a failed publish is the bus's to
/// log and count, the write stands.
async fn asset_changed(events: &Events, version: &str, change: &str) {
    let data = serde_json::json!({ "version_id": version, "change": change });
    let _ = events
        .publish("cascade-events", "asset.changed", data)
        .await;
}

/// `POST /producers` `{"producerId", "name"}`.
#[utoipa::path(post, path = "/producers", tag = "catalog", security(("bearer" = [])), request_body = crate::openapi::NewProducer,
    responses((status = 201, body = crate::openapi::Producer), (status = 409, description = "The producer id is taken"))
)]
pub async fn create_producer(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let producer = NewProducer::parse(&Body::from_value(body)?)?;
    let author = author(&user, &headers);
    let created = in_transaction!(state, |tx| {
        let created = queries::insert_producer(&tx, &producer, user.user_id).await?;
        let id = ("producer", producer.producer_id.as_str());
        author
            .record(&tx, "producer.create", id, None, Some(&created))
            .await?;
        created
    });
    Ok(json(StatusCode::CREATED, created))
}

/// `POST /assets` `{"versionId", "producerId", "name", "metadata"?}`.
#[utoipa::path(post, path = "/assets", tag = "catalog", security(("bearer" = [])), request_body = crate::openapi::NewAsset,
    responses((status = 201, body = crate::openapi::Asset), (status = 403, description = "The producer is another account's"), (status = 404, description = "No such producer"), (status = 409, description = "The version exists"))
)]
pub async fn create_asset(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let asset = NewAsset::parse(&Body::from_value(body)?)?;
    let author = author(&user, &headers);
    let (events, id) = (
        state.app.events.clone(),
        asset.version_id.as_str().to_string(),
    );
    // A new version can complete lineage that named it before it existed, and takes the
    // lineage its publisher recorded into it while it was pending.
    let created = in_transaction!(
        state,
        |tx| {
            queries::authorize_producer(&tx, asset.producer_id.as_str(), user.user_id).await?;
            let created = queries::insert_asset(&tx, &asset, user.user_id).await?;
            let id = ("asset", asset.version_id.as_str());
            author
                .record(&tx, "asset.create", id, None, Some(&created))
                .await?;
            created
        },
        |_created, conn| inv::assets_changed(
            &state,
            conn,
            &[asset.version_id.as_str()],
            Reach::Presence
        )
        .await
    );
    asset_changed(&events, &id, "created").await;
    Ok(json(StatusCode::CREATED, created))
}

/// `PATCH /listings/:versionId` `{"name"?, "metadata"?}` (metadata is replaced, not merged).
#[utoipa::path(patch, path = "/listings/{version_id}", tag = "catalog", security(("bearer" = [])), params(crate::openapi::VersionPath), request_body = crate::openapi::AssetChange,
    responses((status = 200, body = crate::openapi::Asset), (status = 403, description = "The asset is another account's"), (status = 404, description = "No such asset"))
)]
pub async fn update_asset(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    Path(version): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let version = VersionId::parse("versionId", &version)?;
    let change = AssetChange::parse(&Body::from_value(body)?)?;
    let author = author(&user, &headers);
    let (events, id) = (state.app.events.clone(), version.as_str().to_string());
    let updated = in_statement!(
        state,
        |conn| queries::update_asset(conn, &version, &author, &change).await?,
        |_updated, conn| inv::assets_changed(&state, conn, &[version.as_str()], Reach::Content)
            .await
    );
    asset_changed(&events, &id, "updated").await;
    Ok(json(StatusCode::OK, updated))
}

/// `DELETE /listings/:versionId`: the asset goes, with its receipts and policies; lineage
/// naming it stays (readiness of its descendants then reports it missing).
#[utoipa::path(delete, path = "/listings/{version_id}", tag = "catalog", security(("bearer" = [])), params(crate::openapi::VersionPath),
    responses((status = 204, description = "Deleted, with its receipts and policies"), (status = 403, description = "The asset is another account's"), (status = 404, description = "No such asset"))
)]
pub async fn delete_asset(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    Path(version): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let version = VersionId::parse("versionId", &version)?;
    let (events, id) = (state.app.events.clone(), version.as_str().to_string());
    let author = author(&user, &headers);
    in_transaction!(
        state,
        |tx| {
            let before = queries::delete_asset(&tx, &version, user.user_id).await?;
            let id = ("asset", version.as_str());
            author
                .record(&tx, "asset.delete", id, Some(&before), None)
                .await?;
        },
        |_done, conn| inv::assets_changed(&state, conn, &[version.as_str()], Reach::Presence).await
    );
    asset_changed(&events, &id, "deleted").await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /policies` `{"versionId", "document", "expiresAt"?}`.
#[utoipa::path(post, path = "/policies", tag = "catalog", security(("bearer" = [])), request_body = crate::openapi::NewPolicy,
    responses((status = 201, body = crate::openapi::Policy), (status = 403, description = "The asset is another account's"), (status = 404, description = "No such asset"))
)]
pub async fn create_policy(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let policy = NewPolicy::parse(&Body::from_value(body)?)?;
    let author = author(&user, &headers);
    let created = in_transaction!(
        state,
        |tx| {
            let created = queries::insert_policy(&tx, &policy, user.user_id).await?;
            let id = id_in(&created, "policyId")?;
            author
                .record(&tx, "policy.create", ("policy", &id), None, Some(&created))
                .await?;
            created
        },
        |_created, conn| inv::rights_changed(&state, conn, policy.version_id.as_str()).await
    );
    Ok(json(StatusCode::CREATED, created))
}

/// `POST /receipts` `{"versionId", "payer", "amount", "expiresAt"?}`.
#[utoipa::path(post, path = "/receipts", tag = "catalog", security(("bearer" = [])), request_body = crate::openapi::NewReceipt,
    responses((status = 201, body = crate::openapi::Receipt), (status = 403, description = "The asset is another account's"), (status = 404, description = "No such asset"))
)]
pub async fn create_receipt(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let receipt = NewReceipt::parse(&Body::from_value(body)?)?;
    let author = author(&user, &headers);
    let created = in_transaction!(
        state,
        |tx| {
            let created = queries::insert_receipt(&tx, &receipt, user.user_id).await?;
            let id = id_in(&created, "receiptId")?;
            author
                .record(
                    &tx,
                    "receipt.create",
                    ("receipt", &id),
                    None,
                    Some(&created),
                )
                .await?;
            created
        },
        |_created, conn| inv::rights_changed(&state, conn, receipt.version_id.as_str()).await
    );
    Ok(json(StatusCode::CREATED, created))
}

/// `POST /lineage`: an OpenLineage run event. Answers the event id, the edges it added and
/// the edges it left pending. An edge into a version changes what its bundle and readiness
/// say, which is its owner's to say: an output that is an asset must be one of the caller's
/// (403 otherwise). An edge into a version not in the catalog is kept pending, attributed to
/// the caller, and takes effect only if the caller publishes that version (others' are
/// dropped then). Inputs may be anyone's. The event records who sent it.
#[utoipa::path(post, path = "/lineage", tag = "catalog", security(("bearer" = [])), request_body = crate::openapi::RunEvent,
    responses((status = 201, body = crate::openapi::LineageRecorded), (status = 403, description = "An output is another account's asset"))
)]
pub async fn record_lineage(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let event = RunEvent::parse(Body::from_value(body)?.value())?;
    let author = author(&user, &headers);
    let mut outputs: Vec<String> = event
        .edges
        .iter()
        .map(|(_, c)| c.as_str().to_string())
        .collect();
    outputs.sort_unstable();
    outputs.dedup();
    let edges = |list: &[(String, String)]| -> Vec<Value> {
        list.iter()
            .map(|(p, c)| serde_json::json!({"parent": p, "child": c}))
            .collect()
    };
    let (body, _recorded) = in_transaction!(
        state,
        |tx| {
            let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
            let published = queries::published_outputs(&tx, &outputs, user.user_id).await?;
            let (event_id, recorded) =
                queries::insert_event(&tx, &event, user.user_id, &published).await?;
            let body = serde_json::to_vec(&serde_json::json!({
                "eventId": event_id,
                "edgesAdded": edges(&recorded.added),
                "edgesPending": edges(&recorded.pending),
            }))
            .map_err(|e| ApiError::Internal(e.into()))?;
            let id = ("lineage_event", &*event_id.to_string());
            author
                .record(&tx, "lineage.record", id, None, Some(&body))
                .await?;
            (body, recorded)
        },
        |done, conn| {
            // Pending edges change no answer until their child is published (which
            // invalidates it then).
            let mut changed: Vec<&str> = done.1.added.iter().map(|(_, c)| c.as_str()).collect();
            changed.sort_unstable();
            changed.dedup();
            inv::lineage_changed(&state, conn, &changed).await
        }
    );
    Ok(json(StatusCode::CREATED, body))
}

/// `DELETE /lineage?child=&parent=` query.
#[derive(Debug, serde::Deserialize)]
pub struct EdgeParams {
    child: Option<String>,
    parent: Option<String>,
}

/// `DELETE /lineage?child=&parent=`: the owner of the asset `child` removes its parent
/// `parent` (204); 404 when there is no such asset or edge, 403 when the asset is another
/// account's. The bundles and readiness of `child` and its descendants are invalidated as for
/// new lineage.
#[utoipa::path(delete, path = "/lineage", tag = "catalog", security(("bearer" = [])), params(crate::openapi::EdgeParams),
    responses((status = 204, description = "The edge is removed"), (status = 403, description = "The asset is another account's"), (status = 404, description = "No such asset or edge"))
)]
pub async fn remove_lineage(
    State(state): State<CatalogState>,
    CurrentUser(user): CurrentUser,
    Query(params): Query<EdgeParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = |field: &'static str, raw: &Option<String>| {
        let raw = raw.as_deref().ok_or_else(|| {
            ApiError::bad_request(
                field,
                format!("{field}: required query parameter is missing"),
            )
        })?;
        Ok::<_, ApiError>(VersionId::parse(field, raw)?)
    };
    let (child, parent) = (id("child", &params.child)?, id("parent", &params.parent)?);
    let author = author(&user, &headers);
    in_transaction!(
        state,
        |tx| {
            queries::delete_edge(&tx, &child, &parent, user.user_id).await?;
            let edge = serde_json::json!({"parent": parent.as_str(), "child": child.as_str()});
            let edge = serde_json::to_vec(&edge).map_err(|e| ApiError::Internal(e.into()))?;
            let id = format!("{}>{}", parent.as_str(), child.as_str());
            author
                .record(
                    &tx,
                    "lineage.delete",
                    ("lineage_edge", &id),
                    Some(&edge),
                    None,
                )
                .await?;
        },
        |_done, conn| inv::lineage_changed(&state, conn, &[child.as_str()]).await
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}
