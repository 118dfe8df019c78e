//! Memory snapshots of an agent (`agent_memories`, migration `agents/3`): appended, never
//! changed, read latest first; each at most `AGENTS_MEMORY_MAX_BYTES` of JSON; beyond
//! `AGENTS_MEMORY_RETENTION` per agent the oldest are deleted by the append that passes it.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cascade_core::audit::{self, Change};
use cascade_core::cache::Invalidations;
use cascade_core::db::Sql;
use cascade_http::{ApiError, CurrentUser, JsonBody};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Transaction;

use crate::AgentsState;
use crate::error::AgentError;
use crate::model::{self, has_nul};
use crate::queries::{self, Actor};
use crate::routes::path_id;

/// A snapshot as every answer shows it, from `agent_memories m`.
const MEMORY_JSON: &str = "jsonb_build_object(\
    'id', m.id, 'agent_id', m.agent_id, 'data', m.data, 'size_bytes', m.size_bytes, \
    'created_at', to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))";

/// The body of `POST /agents/{id}/memory`: `{"data": <any JSON>}`, its JSON at most `max`
/// bytes. Returns the data and its size.
pub fn parse(value: &Value, max: usize) -> Result<(Value, i32), AgentError> {
    let object = value
        .as_object()
        .ok_or_else(|| AgentError::invalid("body", "must be a JSON object {\"data\": ...}"))?;
    if let Some(unknown) = object.keys().find(|k| *k != "data") {
        return Err(AgentError::invalid(
            unknown.replace('\0', "\\u0000"),
            "unknown field; the body is {\"data\": ...}",
        ));
    }
    let data = object
        .get("data")
        .ok_or_else(|| AgentError::invalid("data", "is required"))?;
    if has_nul(data) {
        return Err(AgentError::invalid(
            "data",
            "must not contain a NUL character (\\u0000) in any key or string",
        ));
    }
    let size = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
    if size > max {
        return Err(AgentError::invalid(
            "data",
            format!("at most {max} bytes of JSON (AGENTS_MEMORY_MAX_BYTES), got {size}"),
        ));
    }
    Ok((data.clone(), i32::try_from(size).unwrap_or(i32::MAX)))
}

/// Appends a snapshot to the caller's agent `agent` and deletes what passes `retention`, with
/// an audit row (its id and size: the data itself is in the snapshot); `None`: no such agent.
pub async fn append(
    tx: &Transaction<'_>,
    actor: &Actor,
    agent: i64,
    data: &Value,
    size: i32,
    retention: i64,
) -> Result<Option<Value>, AgentError> {
    // The agent's row lock orders concurrent appends, so retention counts what committed.
    let owned = tx
        .query_opt(
            "SELECT 1 FROM agents WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL FOR UPDATE",
            &[&agent, &actor.user_id],
        )
        .await?;
    if owned.is_none() {
        return Ok(None);
    }
    let snapshot: Value = tx
        .query_one(
            &format!(
                "WITH m AS (INSERT INTO agent_memories (agent_id, data, size_bytes) \
                 VALUES ($1, $2, $3) RETURNING *) SELECT {MEMORY_JSON} FROM m"
            ),
            &[&agent, data, &size],
        )
        .await?
        .get(0);
    tx.execute(
        "DELETE FROM agent_memories WHERE agent_id = $1 AND id < ( \
           SELECT min(id) FROM (SELECT id FROM agent_memories WHERE agent_id = $1 \
                                ORDER BY id DESC LIMIT $2) newest)",
        &[&agent, &retention],
    )
    .await?;
    let summary = json!({"id": snapshot["id"], "size_bytes": size});
    audit::record(
        tx,
        &Change {
            actor: &audit::user_actor(actor.user_id),
            action: "agent.memory.append",
            entity_type: queries::ENTITY,
            entity_id: &agent.to_string(),
            before: None,
            after: Some(&summary),
            request_id: actor.request_id.as_deref(),
        },
    )
    .await?;
    Ok(Some(snapshot))
}

/// The most bytes of snapshots (their `size_bytes`) one page holds: a page stops before the
/// snapshot that would pass it, so `limit` snapshots of up to `AGENTS_MEMORY_MAX_BYTES` each
/// never make a page of gigabytes. A page always holds at least one snapshot.
pub const PAGE_MAX_BYTES: i64 = 4 * 1024 * 1024;

/// The newest snapshots of the caller's agent, latest first, at most `limit` of them and
/// [`PAGE_MAX_BYTES`] (see there); `None`: no such agent.
pub async fn latest(
    db: &impl Sql,
    owner: i64,
    agent: i64,
    limit: i64,
    before: Option<i64>,
) -> Result<Option<Value>, AgentError> {
    if queries::get(db, owner, agent).await?.is_none() {
        return Ok(None);
    }
    let fetch = limit + 1;
    // The sizes are summed first, newest first, and only the snapshots within the bound are
    // read: the data of those beyond it never leaves PostgreSQL.
    let rows = db
        .query(
            &format!(
                "WITH p AS ( \
                   SELECT m.id, m.size_bytes, \
                          sum(m.size_bytes) OVER (ORDER BY m.id DESC) AS upto \
                   FROM agent_memories m \
                   WHERE m.agent_id = $1 AND ($2::int8 IS NULL OR m.id < $2) \
                   ORDER BY m.id DESC LIMIT $3) \
                 SELECT m.id, {MEMORY_JSON}, (SELECT count(*) FROM p) \
                 FROM p JOIN agent_memories m ON m.id = p.id \
                 WHERE p.upto <= $4 OR p.upto = p.size_bytes \
                 ORDER BY m.id DESC LIMIT $5"
            ),
            &[&agent, &before, &fetch, &PAGE_MAX_BYTES, &limit],
        )
        .await?;
    let found: i64 = rows.first().map_or(0, |row| row.get(2));
    let more = found > rows.len() as i64;
    let next_cursor = more
        .then(|| rows.last().map(|row| row.get::<_, i64>(0).to_string()))
        .flatten();
    let items: Vec<Value> = rows.iter().map(|row| row.get(1)).collect();
    Ok(Some(json!({"items": items, "next_cursor": next_cursor})))
}

/// The query string of `GET /agents/{id}/memory`.
#[derive(Debug, Default, Deserialize)]
pub struct MemoryParams {
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// `POST /agents/{id}/memory`.
#[utoipa::path(post, path = "/agents/{id}/memory", tag = "agents", security(("bearer" = [])),
    params(crate::openapi::AgentPath),
    request_body = crate::openapi::NewMemory,
    responses(
        (status = 201, description = "The snapshot, appended; the oldest past AGENTS_MEMORY_RETENTION are gone", body = crate::openapi::Memory),
        (status = 400, description = "Not an agent id, or `data` is missing, holds a NUL, or is over AGENTS_MEMORY_MAX_BYTES; nothing is written"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such agent of the caller's"),
    )
)]
pub async fn append_route(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let agent = path_id(&id)?;
    let (data, size) = parse(&body, state.config.memory_max_bytes)?;
    let actor = crate::routes::actor(&me, &headers);
    let retention = state.config.memory_retention;
    let snapshot = crate::transaction(
        &state,
        move |tx| Box::pin(async move { append(tx, &actor, agent, &data, size, retention).await }),
        |_| Invalidations::new(),
    )
    .await?
    .ok_or_else(|| queries::not_found(agent))?;
    Ok((StatusCode::CREATED, Json(snapshot)).into_response())
}

/// `GET /agents/{id}/memory?limit=&cursor=`.
#[utoipa::path(get, path = "/agents/{id}/memory", tag = "agents", security(("bearer" = [])),
    params(crate::openapi::AgentPath, crate::openapi::PageParams),
    responses(
        (status = 200, description = "The agent's snapshots, latest first", body = crate::openapi::MemoryPage),
        (status = 400, description = "Not an agent id, or a parameter is malformed (named in `field`)"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such agent of the caller's"),
    )
)]
pub async fn latest_route(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    Query(params): Query<MemoryParams>,
) -> Result<Response, ApiError> {
    let agent = path_id(&id)?;
    let limit = model::parse_limit(params.limit.as_deref())?;
    let before = model::parse_cursor(params.cursor.as_deref())?;
    let conn = state.app.db.conn().await?;
    let page = latest(&conn, me.user_id, agent, limit, before)
        .await?
        .ok_or_else(|| queries::not_found(agent))?;
    Ok(Json(page).into_response())
}
