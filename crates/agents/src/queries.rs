//! The SQL of agents (table: `migrations/0001_agents.sql`). Agents are built as JSON by
//! PostgreSQL, so the same value is the response, the cached entry and the audit row's
//! `before`/`after`.
//!
//! Every write takes the caller's transaction and writes its audit rows in it
//! ([`cascade_core::audit`]): the change and its record commit together or not at all.

use cascade_core::audit::{self, Change};
use cascade_core::db::Sql;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Transaction;

use crate::error::AgentError;
use crate::model::{AgentPatch, ListQuery, NewAgent};

/// The entity type of agents in the audit log.
pub const ENTITY: &str = "agent";

/// An agent as every answer shows it, from `agents a`.
pub(crate) const AGENT_JSON: &str = "jsonb_build_object(\
    'id', a.id, 'name', a.name, 'type', a.type, 'config', a.config, \
    'capabilities', to_jsonb(a.capabilities), 'status', a.status, 'version', a.version, \
    'created_at', to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
    'updated_at', to_char(a.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))";

/// Who and under which request: what every audit row of a write carries.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: i64,
    pub request_id: Option<String>,
}

fn id_of(agent: &Value) -> Result<i64, AgentError> {
    agent["id"]
        .as_i64()
        .ok_or_else(|| AgentError::Internal("an agent without an id".into()))
}

/// Creates `agents` for `actor` in one statement, with one audit row each; returns them in
/// the order given.
pub async fn create(
    tx: &Transaction<'_>,
    actor: &Actor,
    agents: &[NewAgent],
) -> Result<Vec<Value>, AgentError> {
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let kinds: Vec<&str> = agents.iter().map(|a| a.kind.as_str()).collect();
    let configs: Vec<&Value> = agents.iter().map(|a| &a.config).collect();
    // Ragged text arrays cannot be a text[][]: each list travels as a JSON array.
    let capabilities: Vec<Value> = agents
        .iter()
        .map(|a| Value::from(a.capabilities.clone()))
        .collect();
    let statuses: Vec<&str> = agents.iter().map(|a| a.status.as_str()).collect();
    let rows = tx
        .query(
            &format!(
                "WITH input AS ( \
                   SELECT * FROM UNNEST($2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::text[]) \
                     WITH ORDINALITY AS i(name, type, config, capabilities, status, n)), \
                 a AS ( \
                   INSERT INTO agents (owner_id, name, type, config, capabilities, status) \
                   SELECT $1, name, type, config, \
                          ARRAY(SELECT jsonb_array_elements_text(capabilities)), status \
                   FROM input ORDER BY n RETURNING *) \
                 SELECT {AGENT_JSON} FROM a ORDER BY a.id"
            ),
            &[&actor.user_id, &names, &kinds, &configs, &capabilities, &statuses],
        )
        .await?;
    let created: Vec<Value> = rows.iter().map(|row| row.get(0)).collect();
    let ids: Vec<String> = created
        .iter()
        .map(|agent| id_of(agent).map(|id| id.to_string()))
        .collect::<Result<_, _>>()?;
    let who = audit::user_actor(actor.user_id);
    let changes: Vec<Change<'_>> = created
        .iter()
        .zip(&ids)
        .map(|(agent, id)| Change {
            actor: &who,
            action: "agent.create",
            entity_type: ENTITY,
            entity_id: id,
            before: None,
            after: Some(agent),
            request_id: actor.request_id.as_deref(),
        })
        .collect();
    audit::record_many(tx, &changes).await?;
    Ok(created)
}

/// One live agent of `owner`, or `None`.
pub async fn get(db: &impl Sql, owner: i64, id: i64) -> Result<Option<Value>, AgentError> {
    Ok(db
        .query_opt(
            &format!(
                "SELECT {AGENT_JSON} FROM agents a \
                 WHERE a.id = $1 AND a.owner_id = $2 AND a.deleted_at IS NULL"
            ),
            &[&id, &owner],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Locks one live agent of `owner` for a change, or 404.
async fn lock(tx: &Transaction<'_>, owner: i64, id: i64) -> Result<Value, AgentError> {
    tx.query_opt(
        &format!(
            "SELECT {AGENT_JSON} FROM agents a \
             WHERE a.id = $1 AND a.owner_id = $2 AND a.deleted_at IS NULL FOR UPDATE"
        ),
        &[&id, &owner],
    )
    .await?
    .map(|row| row.get(0))
    .ok_or_else(|| not_found(id))
}

pub fn not_found(id: i64) -> AgentError {
    AgentError::NotFound(format!("no agent {id}"))
}

/// Applies `patch` to the caller's agent `id`, with its audit row; returns the agent after.
pub async fn update(
    tx: &Transaction<'_>,
    actor: &Actor,
    id: i64,
    patch: &AgentPatch,
) -> Result<Value, AgentError> {
    let before = lock(tx, actor.user_id, id).await?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE agents a SET \
                   name = coalesce($2, a.name), type = coalesce($3, a.type), \
                   config = coalesce($4, a.config), capabilities = coalesce($5, a.capabilities), \
                   status = coalesce($6, a.status), version = a.version + 1, updated_at = now() \
                 WHERE a.id = $1 RETURNING {AGENT_JSON}"
            ),
            &[
                &id,
                &patch.name,
                &patch.kind,
                &patch.config,
                &patch.capabilities,
                &patch.status,
            ],
        )
        .await?;
    let after: Value = row.get(0);
    record_one(tx, actor, "agent.update", id, Some(&before), Some(&after)).await?;
    Ok(after)
}

/// Deletes the caller's agent `id` softly, with its audit row.
pub async fn delete(tx: &Transaction<'_>, actor: &Actor, id: i64) -> Result<(), AgentError> {
    let before = lock(tx, actor.user_id, id).await?;
    tx.execute(
        "UPDATE agents SET deleted_at = now(), updated_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    record_one(tx, actor, "agent.delete", id, Some(&before), None).await
}

async fn record_one(
    tx: &Transaction<'_>,
    actor: &Actor,
    action: &str,
    id: i64,
    before: Option<&Value>,
    after: Option<&Value>,
) -> Result<(), AgentError> {
    audit::record(
        tx,
        &Change {
            actor: &audit::user_actor(actor.user_id),
            action,
            entity_type: ENTITY,
            entity_id: &id.to_string(),
            before,
            after,
            request_id: actor.request_id.as_deref(),
        },
    )
    .await?;
    Ok(())
}

/// A page of `GET /agents`: newest first, and the cursor of the next page when there is one.
#[derive(Debug, Serialize)]
pub struct AgentPage {
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

/// The page of `owner`'s live agents that `query` selects.
pub async fn list(db: &impl Sql, owner: i64, query: &ListQuery) -> Result<AgentPage, AgentError> {
    let fetch = query.limit + 1;
    let rows = db
        .query(
            &format!(
                "SELECT a.id, {AGENT_JSON} FROM agents a \
                 WHERE a.owner_id = $1 AND a.deleted_at IS NULL \
                   AND ($2::text IS NULL OR a.status = $2) \
                   AND ($3::text IS NULL OR a.type = $3) \
                   AND ($4::text IS NULL OR a.capabilities @> ARRAY[$4::text]) \
                   AND ($5::int8 IS NULL OR a.id < $5) \
                 ORDER BY a.id DESC LIMIT $6"
            ),
            &[
                &owner,
                &query.status,
                &query.kind,
                &query.capability,
                &query.before_id,
                &fetch,
            ],
        )
        .await?;
    let more = rows.len() as i64 > query.limit;
    let rows = &rows[..rows.len().min(query.limit as usize)];
    let next_cursor = more
        .then(|| rows.last().map(|row| row.get::<_, i64>(0).to_string()))
        .flatten();
    Ok(AgentPage {
        items: rows.iter().map(|row| row.get(1)).collect(),
        next_cursor,
    })
}
