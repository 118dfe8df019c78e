//! `/agents…` and `/audit`: every route needs a bearer token and sees the caller's own rows
//! only (another account's agent is a 404, as one that does not exist).
//!
//! Reads are cache-aside (`agents:<owner>:<id>`, `agent_lists:<owner>:<query>` tagged
//! `agents-of:<owner>`); a write commits the change and its audit rows in one transaction,
//! then removes what it made stale before it answers.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cascade_core::cache::{CachedBody, Invalidations};
use cascade_http::{ApiError, CurrentUser, JsonBody};
use serde_json::{Value, json};

use crate::AgentsState;
use crate::config::{AGENT_LISTS, AGENTS};
use crate::error::AgentError;
use crate::model::{self, AgentPatch, AuditParams, ListParams, ListQuery, NewAgent};
use crate::queries::{self, Actor};

/// The tag of every cached list page of `owner`.
pub fn owner_tag(owner: i64) -> String {
    format!("agents-of:{owner}")
}

/// The cache key of agent `id` of `owner`.
pub fn agent_key(owner: i64, id: i64) -> String {
    format!("{owner}:{id}")
}

/// Who is writing, and under which request.
pub fn actor(me: &cascade_core::identity::Principal, headers: &HeaderMap) -> Actor {
    Actor {
        user_id: me.user_id,
        request_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

/// An id in a path (`/agents/{id}`, `/workflows/{id}`, `/executions/{id}`): 400 naming `id`.
pub fn path_id(raw: &str) -> Result<i64, ApiError> {
    model::parse_id_text(raw)
        .ok_or_else(|| ApiError::bad_request("id", "id: must be an id (a positive integer)"))
}

/// A write: what runs in the transaction.
enum Op {
    Create(Vec<NewAgent>),
    Update(i64, AgentPatch),
    Delete(i64),
}

enum Done {
    Created(Vec<Value>),
    Updated(Value),
    Deleted,
}

/// Runs `op` in a transaction with its audit rows, commits, then removes the owner's list
/// pages and the agents' entries, before the caller answers (see [`crate::transaction`]).
async fn write(state: &AgentsState, actor: Actor, op: Op) -> Result<Done, ApiError> {
    let owner = actor.user_id;
    let known: Vec<i64> = match &op {
        Op::Create(_) => Vec::new(),
        Op::Update(id, _) | Op::Delete(id) => vec![*id],
    };
    crate::transaction(
        state,
        move |tx| {
            Box::pin(async move {
                Ok(match &op {
                    Op::Create(agents) => Done::Created(queries::create(tx, &actor, agents).await?),
                    Op::Update(id, patch) => {
                        Done::Updated(queries::update(tx, &actor, *id, patch).await?)
                    }
                    Op::Delete(id) => {
                        queries::delete(tx, &actor, *id).await?;
                        Done::Deleted
                    }
                })
            })
        },
        move |done| {
            let ids: Vec<i64> = match done {
                // A read of a new id before it existed may have cached "no such agent".
                Done::Created(created) => created.iter().filter_map(|a| a["id"].as_i64()).collect(),
                _ => known,
            };
            let keys: Vec<String> = ids.iter().map(|id| agent_key(owner, *id)).collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut stale = Invalidations::new();
            stale.keys(AGENTS, &keys).tags([owner_tag(owner)]);
            stale
        },
    )
    .await
}

/// A cached JSON body. `no-store` is set on every route of the module (account data).
fn json_body(body: &CachedBody) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Bytes::from_owner(body.bytes().clone()),
    )
        .into_response()
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, AgentError> {
    serde_json::to_vec(value).map_err(|err| AgentError::Internal(format!("encoding: {err}")))
}

/// `POST /agents`.
#[utoipa::path(post, path = "/agents", tag = "agents", security(("bearer" = [])),
    request_body = crate::openapi::NewAgent,
    responses(
        (status = 201, description = "The agent, owned by the caller", body = crate::openapi::Agent),
        (status = 400, description = "A field is malformed (named in `field`); nothing is written"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn create(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let agent = NewAgent::parse("", &body)?;
    let Done::Created(mut created) =
        write(&state, actor(&me, &headers), Op::Create(vec![agent])).await?
    else {
        return Err(AgentError::Internal("a create that created nothing".into()).into());
    };
    let agent = created.pop().unwrap_or(Value::Null);
    Ok((StatusCode::CREATED, Json(agent)).into_response())
}

/// `POST /agents/bulk`: all of them or none.
#[utoipa::path(post, path = "/agents/bulk", tag = "agents", security(("bearer" = [])),
    request_body = crate::openapi::NewAgents,
    responses(
        (status = 201, description = "The agents, in the order given", body = crate::openapi::AgentList),
        (status = 400, description = "An agent is malformed (named in `field`, e.g. `agents[2].name`), or there are none or more than AGENTS_BULK_MAX; nothing is written"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn create_bulk(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let agents = NewAgent::parse_bulk(&body, state.config.bulk_max)?;
    let Done::Created(created) = write(&state, actor(&me, &headers), Op::Create(agents)).await?
    else {
        return Err(AgentError::Internal("a create that created nothing".into()).into());
    };
    Ok((StatusCode::CREATED, Json(json!({ "items": created }))).into_response())
}

/// `GET /agents/{id}`.
#[utoipa::path(get, path = "/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(crate::openapi::AgentPath),
    responses(
        (status = 200, description = "The agent", body = crate::openapi::Agent),
        (status = 400, description = "Not an agent id"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such agent of the caller's (deleted, or another account's)"),
    )
)]
pub async fn get(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let owner = me.user_id;
    let db = state.app.db.clone();
    let (body, _) = state
        .app
        .cache
        .get_or_load_body(AGENTS, &agent_key(owner, id), &[], move || async move {
            let conn = db.conn().await?;
            queries::get(&conn, owner, id)
                .await?
                .map(|agent| to_json(&agent))
                .transpose()
        })
        .await?;
    let body = body.ok_or_else(|| queries::not_found(id))?;
    Ok(json_body(&body))
}

/// `GET /agents?status=&type=&capability=&limit=&cursor=`.
#[utoipa::path(get, path = "/agents", tag = "agents", security(("bearer" = [])),
    params(crate::openapi::AgentListParams),
    responses(
        (status = 200, description = "A page of the caller's agents, newest first", body = crate::openapi::AgentPage),
        (status = 400, description = "A parameter is malformed (named in `field`)"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn list(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let query = ListQuery::parse(&params)?;
    let owner = me.user_id;
    let db = state.app.db.clone();
    let key = query.key(owner);
    let (body, _) = state
        .app
        .cache
        .get_or_load_body(AGENT_LISTS, &key, &[owner_tag(owner)], move || async move {
            let conn = db.conn().await?;
            let page = queries::list(&conn, owner, &query).await?;
            to_json(&page).map(Some)
        })
        .await?;
    let body = body.ok_or_else(|| AgentError::Internal("a page cannot be absent".into()))?;
    Ok(json_body(&body))
}

/// `PATCH /agents/{id}`.
#[utoipa::path(patch, path = "/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(crate::openapi::AgentPath),
    request_body = crate::openapi::AgentChange,
    responses(
        (status = 200, description = "The agent after the change (its version one higher; `{}` changes nothing)", body = crate::openapi::Agent),
        (status = 400, description = "Not an agent id, or a field is malformed (named in `field`); nothing is written"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such agent of the caller's"),
    )
)]
pub async fn update(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let patch = AgentPatch::parse(&body)?;
    if patch.is_empty() {
        // Nothing to change: the agent as it is, no write, no audit row.
        let conn = state.app.db.conn().await?;
        let agent = queries::get(&conn, me.user_id, id)
            .await?
            .ok_or_else(|| queries::not_found(id))?;
        return Ok(Json(agent).into_response());
    }
    let Done::Updated(agent) = write(&state, actor(&me, &headers), Op::Update(id, patch)).await?
    else {
        return Err(AgentError::Internal("an update that updated nothing".into()).into());
    };
    Ok(Json(agent).into_response())
}

/// `DELETE /agents/{id}`: soft; the agent disappears from every read, its audit rows stay.
#[utoipa::path(delete, path = "/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(crate::openapi::AgentPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not an agent id"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such agent of the caller's"),
    )
)]
pub async fn delete(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    write(&state, actor(&me, &headers), Op::Delete(id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /audit?entity_type=&entity_id=&action=&since=&until=&limit=&cursor=`: the caller's own
/// audit rows (those whose actor is their account), newest first. Not cached: the trail is
/// read rarely and must be exact.
#[utoipa::path(get, path = "/audit", tag = "audit", security(("bearer" = [])),
    params(crate::openapi::AuditParams),
    responses(
        (status = 200, description = "A page of the caller's audit rows, newest first", body = crate::openapi::AuditPage),
        (status = 400, description = "A parameter is malformed (named in `field`)"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn audit(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Query(params): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let filter = model::audit_filter(&params, Some(cascade_core::audit::user_actor(me.user_id)))?;
    let conn = state.app.db.conn().await?;
    let page = cascade_core::audit::list(&conn, &filter).await?;
    Ok(Json(page).into_response())
}

/// `GET /audit/all?actor=&…`: every row, the server's own (`system:*`) included, for operators
/// (`Authorization: Bearer <ADMIN_TOKEN>`, as `/health/db`).
#[utoipa::path(get, path = "/audit/all", tag = "audit", security(("admin" = [])),
    params(crate::openapi::AllAuditParams, crate::openapi::AuditParams),
    responses(
        (status = 200, description = "A page of every actor's audit rows, newest first", body = crate::openapi::AuditPage),
        (status = 400, description = "A parameter is malformed (named in `field`)"),
        (status = 401, description = "No or wrong operator token (ADMIN_TOKEN)"),
        (status = 403, description = "Closed: ADMIN_TOKEN is not configured"),
    )
)]
pub async fn audit_all(
    State(state): State<AgentsState>,
    headers: HeaderMap,
    Query(params): Query<model::AllAuditParams>,
) -> Result<Response, ApiError> {
    cascade_http::auth::require_admin(&state.app, &headers)?;
    let filter = model::audit_filter(&params.rest, params.actor.clone())?;
    let conn = state.app.db.conn().await?;
    let page = cascade_core::audit::list(&conn, &filter).await?;
    Ok(Json(page).into_response())
}
