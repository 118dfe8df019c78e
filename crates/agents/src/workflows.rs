//! `/workflows…` and `/executions…`: a workflow is an ordered list of steps, each naming a
//! capability (which executor runs it) and its input; an execution runs one workflow once,
//! through the queue (`queue.rs`) and the workers (`worker.rs`).
//!
//! Not cached: an execution's state changes under the reader (a worker moves it), and a
//! workflow is read when it is enqueued, in the enqueue's own statement. Only searches of
//! workflows are (`search.rs`); a create removes the owner's.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cascade_core::audit::{self, Change};
use cascade_core::cache::Invalidations;
use cascade_core::db::Sql;
use cascade_http::{ApiError, CurrentUser, JsonBody};
use serde_json::{Map, Value};
use tokio_postgres::Transaction;

use crate::AgentsState;
use crate::error::AgentError;
use crate::executor::Executors;
use crate::model::{self, has_nul};
use crate::queries::Actor;
use crate::queue::{self, Cancelled};

/// Most steps of a workflow.
pub const MAX_STEPS: usize = 50;
/// Most bytes of a workflow's steps, or of an execution's input (as compact JSON).
pub const MAX_JSON_BYTES: usize = 64 * 1024;

/// A workflow as every answer shows it, from `workflows w`.
pub(crate) const WORKFLOW_JSON: &str = "jsonb_build_object(\
    'id', w.id, 'name', w.name, 'steps', w.steps, 'version', w.version, \
    'created_at', to_char(w.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))";

/// A workflow to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorkflow {
    pub name: String,
    /// `[{"capability": .., "input": ..}]`, normalised (`input` present).
    pub steps: Value,
}

fn json_size(field: &str, value: &Value) -> Result<(), AgentError> {
    if has_nul(value) {
        return Err(AgentError::invalid(
            field,
            "must not contain a NUL character (\\u0000) in any key or string",
        ));
    }
    let size = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
    if size > MAX_JSON_BYTES {
        return Err(AgentError::invalid(
            field,
            format!("at most {MAX_JSON_BYTES} bytes of JSON, got {size}"),
        ));
    }
    Ok(())
}

fn only_fields<'a>(
    value: &'a Value,
    at: &str,
    fields: &[&str],
) -> Result<&'a Map<String, Value>, AgentError> {
    let object = value
        .as_object()
        .ok_or_else(|| AgentError::invalid(at, "must be a JSON object"))?;
    if let Some(unknown) = object.keys().find(|k| !fields.contains(&k.as_str())) {
        let name = unknown.replace('\0', "\\u0000");
        let field = if at == "body" {
            name
        } else {
            format!("{at}.{name}")
        };
        return Err(AgentError::invalid(
            field,
            format!("unknown field; the fields are {}", fields.join(", ")),
        ));
    }
    Ok(object)
}

impl NewWorkflow {
    /// The body of `POST /workflows`; every step's capability must have an executor here.
    pub fn parse(value: &Value, executors: &Executors) -> Result<NewWorkflow, AgentError> {
        let object = only_fields(value, "body", &["name", "steps"])?;
        let name = model::name(
            "name",
            object
                .get("name")
                .ok_or_else(|| AgentError::invalid("name", "is required"))?,
        )?;
        let list = object
            .get("steps")
            .ok_or_else(|| AgentError::invalid("steps", "is required"))?
            .as_array()
            .ok_or_else(|| AgentError::invalid("steps", "must be an array of steps"))?;
        if list.is_empty() || list.len() > MAX_STEPS {
            return Err(AgentError::invalid(
                "steps",
                format!("must hold 1 to {MAX_STEPS} steps, got {}", list.len()),
            ));
        }
        let mut steps = Vec::with_capacity(list.len());
        for (i, step) in list.iter().enumerate() {
            let at = format!("steps[{i}]");
            let step = only_fields(step, &at, &["capability", "input"])?;
            let field = format!("{at}.capability");
            let capability = step
                .get("capability")
                .ok_or_else(|| AgentError::invalid(field.clone(), "is required"))?
                .as_str()
                .ok_or_else(|| AgentError::invalid(field.clone(), "must be a string"))?;
            let capability = model::parse_word(&field, capability)?;
            if executors.get(&capability).is_none() {
                return Err(AgentError::invalid(
                    field,
                    format!(
                        "no executor for {capability:?} on this server; the capabilities are {}",
                        executors.capabilities().join(", ")
                    ),
                ));
            }
            let input = step.get("input").cloned().unwrap_or(Value::Null);
            steps.push(serde_json::json!({"capability": capability, "input": input}));
        }
        let steps = Value::Array(steps);
        json_size("steps", &steps)?;
        Ok(NewWorkflow { name, steps })
    }
}

/// The body of `POST /workflows/{id}/executions`: `input` (an object, default `{}`) and
/// `max_attempts` (1 to 100, default `AGENTS_MAX_ATTEMPTS`).
pub fn parse_enqueue(value: &Value, default_attempts: i32) -> Result<(Value, i32), AgentError> {
    let object = only_fields(value, "body", &["input", "max_attempts"])?;
    let input = match object.get("input") {
        None => Value::Object(Map::new()),
        Some(input) if input.is_object() => input.clone(),
        Some(_) => return Err(AgentError::invalid("input", "must be a JSON object")),
    };
    json_size("input", &input)?;
    let attempts = match object.get("max_attempts") {
        None => default_attempts,
        Some(n) => n
            .as_i64()
            .filter(|n| (1..=100).contains(n))
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| {
                AgentError::invalid("max_attempts", "must be a whole number from 1 to 100")
            })?,
    };
    Ok((input, attempts))
}

/// Creates `owner`'s workflow with its audit row.
pub async fn insert(
    tx: &Transaction<'_>,
    actor: &Actor,
    workflow: &NewWorkflow,
) -> Result<Value, AgentError> {
    let created: Value = tx
        .query_one(
            &format!(
                "WITH w AS (INSERT INTO workflows (owner_id, name, steps) VALUES ($1, $2, $3) RETURNING *) \
                 SELECT {WORKFLOW_JSON} FROM w"
            ),
            &[&actor.user_id, &workflow.name, &workflow.steps],
        )
        .await?
        .get(0);
    audit::record(
        tx,
        &Change {
            actor: &audit::user_actor(actor.user_id),
            action: "workflow.create",
            entity_type: "workflow",
            entity_id: &created["id"].to_string(),
            before: None,
            after: Some(&created),
            request_id: actor.request_id.as_deref(),
        },
    )
    .await?;
    Ok(created)
}

/// One live workflow of `owner`'s.
pub async fn get_workflow(db: &impl Sql, owner: i64, id: i64) -> Result<Option<Value>, AgentError> {
    Ok(db
        .query_opt(
            &format!(
                "SELECT {WORKFLOW_JSON} FROM workflows w \
                 WHERE w.id = $1 AND w.owner_id = $2 AND w.deleted_at IS NULL"
            ),
            &[&id, &owner],
        )
        .await?
        .map(|row| row.get(0)))
}

/// `POST /workflows`.
#[utoipa::path(post, path = "/workflows", tag = "workflows", security(("bearer" = [])),
    request_body = crate::openapi::NewWorkflow,
    responses(
        (status = 201, description = "The workflow, owned by the caller", body = crate::openapi::Workflow),
        (status = 400, description = "A field is malformed or a step names a capability no executor has (named in `field`); nothing is written"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn create(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let workflow = NewWorkflow::parse(&body, &state.executors)?;
    let actor = crate::routes::actor(&me, &headers);
    let owner = me.user_id;
    let created = crate::transaction(
        &state,
        move |tx| Box::pin(async move { insert(tx, &actor, &workflow).await }),
        // Searches of the owner's workflows (`search.rs`) are the only cached reads of them.
        move |_| {
            let mut stale = Invalidations::new();
            stale.tags([crate::search::workflows_tag(owner)]);
            stale
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /workflows/{id}`.
#[utoipa::path(get, path = "/workflows/{id}", tag = "workflows", security(("bearer" = [])),
    params(crate::openapi::IdPath),
    responses(
        (status = 200, description = "The workflow", body = crate::openapi::Workflow),
        (status = 400, description = "Not an id"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such workflow of the caller's"),
    )
)]
pub async fn get(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = crate::routes::path_id(&id)?;
    let conn = state.app.db.conn().await?;
    let workflow = get_workflow(&conn, me.user_id, id)
        .await?
        .ok_or_else(|| AgentError::NotFound(format!("no workflow {id}")))?;
    Ok(Json(workflow).into_response())
}

/// `POST /workflows/{id}/executions`: enqueues one execution.
#[utoipa::path(post, path = "/workflows/{id}/executions", tag = "workflows", security(("bearer" = [])),
    params(crate::openapi::IdPath),
    request_body = crate::openapi::NewExecution,
    responses(
        (status = 202, description = "Queued; a worker runs it", body = crate::openapi::Execution),
        (status = 400, description = "Not an id, or a field is malformed (named in `field`); nothing is written"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such workflow of the caller's"),
    )
)]
pub async fn enqueue(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let workflow = crate::routes::path_id(&id)?;
    let (input, attempts) = parse_enqueue(&body, state.config.executions.max_attempts)?;
    let actor = crate::routes::actor(&me, &headers);
    let queued = crate::transaction(
        &state,
        move |tx| {
            Box::pin(async move { queue::enqueue(tx, &actor, workflow, &input, attempts).await })
        },
        |_| Invalidations::new(),
    )
    .await?
    .ok_or_else(|| AgentError::NotFound(format!("no workflow {workflow}")))?;
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

/// `GET /executions/{id}`.
#[utoipa::path(get, path = "/executions/{id}", tag = "workflows", security(("bearer" = [])),
    params(crate::openapi::IdPath),
    responses(
        (status = 200, description = "The execution as it is now", body = crate::openapi::Execution),
        (status = 400, description = "Not an id"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such execution of the caller's"),
    )
)]
pub async fn execution(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = crate::routes::path_id(&id)?;
    let conn = state.app.db.conn().await?;
    let execution = queue::get(&conn, me.user_id, id)
        .await?
        .ok_or_else(|| AgentError::NotFound(format!("no execution {id}")))?;
    Ok(Json(execution).into_response())
}

/// `POST /executions/{id}/cancel`.
#[utoipa::path(post, path = "/executions/{id}/cancel", tag = "workflows", security(("bearer" = [])),
    params(crate::openapi::IdPath),
    responses(
        (status = 200, description = "Cancelled (it was queued), or marked to stop before its next step (it is running: `cancel_requested`)", body = crate::openapi::Execution),
        (status = 400, description = "Not an id"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such execution of the caller's"),
        (status = 409, description = "It has finished already"),
    )
)]
pub async fn cancel(
    State(state): State<AgentsState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = crate::routes::path_id(&id)?;
    let actor = crate::routes::actor(&me, &headers);
    let outcome = crate::transaction(
        &state,
        move |tx| Box::pin(async move { queue::cancel(tx, &actor, id).await }),
        |_| Invalidations::new(),
    )
    .await?;
    match outcome {
        Cancelled::Done(execution) => Ok(Json(execution).into_response()),
        Cancelled::Finished(execution) => Err(ApiError::Conflict(format!(
            "execution {id} has finished already ({})",
            execution["state"].as_str().unwrap_or("finished")
        ))),
        Cancelled::NotFound => Err(AgentError::NotFound(format!("no execution {id}")).into()),
    }
}
