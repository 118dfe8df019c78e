//! The agents module's part of the API document: its paths (the `#[utoipa::path]` attributes
//! on its handlers) and the schemas of their bodies, written as types (bodies are parsed field
//! by field in `model.rs`; the fuzzer keeps the two honest).

#![allow(dead_code)] // the types describe bodies; they are never built

use cascade_http::openapi::JsonObject;
use utoipa::{IntoParams, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::routes::create,
        crate::routes::create_bulk,
        crate::routes::get,
        crate::routes::list,
        crate::routes::update,
        crate::routes::delete,
        crate::routes::audit,
        crate::routes::audit_all,
        crate::memory::append_route,
        crate::memory::latest_route,
        crate::workflows::create,
        crate::workflows::get,
        crate::workflows::enqueue,
        crate::workflows::execution,
        crate::workflows::cancel,
    ),
    tags(
        (name = "agents", description = "The caller's AI agents: name, type, config, capabilities, status. Another account's agents are invisible (404). Every change writes an audit row in its own transaction."),
        (name = "workflows", description = "Workflows (ordered steps, each naming a capability: `echo`, `noop`, `http` when configured) and their executions: queued, run once by a worker, retried with backoff up to `max_attempts`, cancellable between steps."),
        (name = "audit", description = "The audit trail: one row per change (actor, action, entity, before/after, request id, time), append-only in PostgreSQL itself. An account reads the rows it caused."),
    )
)]
pub struct AgentsApi;

/// What an agent can be.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Status {
    Active,
    Inactive,
    Paused,
}

/// An agent.
#[derive(ToSchema)]
pub struct Agent {
    #[schema(minimum = 1)]
    pub id: i64,
    pub name: String,
    #[schema(rename = "type")]
    pub kind: String,
    pub config: JsonObject,
    pub capabilities: Vec<String>,
    pub status: Status,
    /// 1 at creation, one more with each change.
    #[schema(minimum = 1)]
    pub version: i32,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
}

/// The body of `POST /agents`.
#[derive(ToSchema)]
pub struct NewAgent {
    /// 1 to 200 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    )]
    pub name: String,
    /// Lowercase letters, digits, `_`, `.`, `-`; starting with a letter or digit.
    #[schema(rename = "type", pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$")]
    pub kind: String,
    /// A JSON object of at most 64 KiB (default `{}`).
    #[schema(nullable = false)]
    pub config: Option<JsonObject>,
    /// At most 32, each spelled as `type`; repeats count once.
    #[schema(nullable = false, max_items = 32, inline)]
    pub capabilities: Option<Vec<AgentCapability>>,
    /// Default `active`.
    #[schema(nullable = false)]
    pub status: Option<Status>,
}

/// An agent's capability: spelled as its `type`.
#[derive(ToSchema)]
#[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$")]
pub struct AgentCapability(String);

/// The body of `PATCH /agents/{id}`: the fields to replace (`{}` changes nothing and answers
/// the agent as it is).
#[derive(ToSchema)]
pub struct AgentChange {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    )]
    #[schema(nullable = false)]
    pub name: Option<String>,
    #[schema(
        nullable = false,
        rename = "type",
        pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$"
    )]
    pub kind: Option<String>,
    #[schema(nullable = false)]
    pub config: Option<JsonObject>,
    #[schema(nullable = false, max_items = 32, inline)]
    pub capabilities: Option<Vec<AgentCapability>>,
    #[schema(nullable = false)]
    pub status: Option<Status>,
}

/// The body of `POST /agents/bulk`.
#[derive(ToSchema)]
pub struct NewAgents {
    /// 1 to AGENTS_BULK_MAX (default 100) agents.
    #[schema(min_items = 1, max_items = 100)]
    pub agents: Vec<NewAgent>,
}

/// Agents created together.
#[derive(ToSchema)]
pub struct AgentList {
    pub items: Vec<Agent>,
}

/// A page of `GET /agents`.
#[derive(ToSchema)]
pub struct AgentPage {
    pub items: Vec<Agent>,
    /// The `cursor` of the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// An agent's id in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AgentPath {
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    id: String,
}

/// `GET /agents` filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentListParams {
    /// Only agents in this status.
    #[param(inline)]
    status: Option<Status>,
    /// Only agents of this type.
    #[param(rename = "type", pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$")]
    kind: Option<String>,
    /// Only agents with this capability.
    #[param(pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$")]
    capability: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// `GET /audit` filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only rows about this kind of entity (`agent`).
    #[param(min_length = 1, max_length = 200, pattern = "^[^\\u0000]+$")]
    entity_type: Option<String>,
    /// Only rows about this entity.
    #[param(min_length = 1, max_length = 200, pattern = "^[^\\u0000]+$")]
    entity_id: Option<String>,
    /// Only rows of this action (`agent.create`, `agent.update`, `agent.delete`).
    #[param(min_length = 1, max_length = 200, pattern = "^[^\\u0000]+$")]
    action: Option<String>,
    /// Rows at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Rows before this time (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// A row of the audit log.
#[derive(ToSchema)]
pub struct AuditEntry {
    #[schema(minimum = 1)]
    pub id: i64,
    /// RFC 3339, UTC, to the microsecond.
    pub at: String,
    /// `user:<id>` for an account.
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    /// The entity before the change; null for a create.
    pub before: Option<JsonObject>,
    /// The entity after the change; null for a delete.
    pub after: Option<JsonObject>,
    pub request_id: Option<String>,
}

/// A page of `GET /audit`.
#[derive(ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    /// The `cursor` of the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// An id in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdPath {
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    id: String,
}

/// The step capabilities every server has: `echo` answers its input, `noop` answers `null`.
/// A server may have more: `http` (with `AGENTS_HTTP_URL`: `{"method", "path", "query"|"form"}`
/// → `{"status", "body"}`), and the executors its build registers; a capability the server has
/// no executor for is a 400.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Capability {
    Echo,
    Noop,
}

/// A workflow step.
#[derive(ToSchema)]
pub struct WorkflowStep {
    /// Which executor runs it.
    pub capability: Capability,
    /// What the executor receives (any JSON; `null` when absent).
    pub input: Option<serde_json::Value>,
}

/// The body of `POST /workflows`.
#[derive(ToSchema)]
pub struct NewWorkflow {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    )]
    pub name: String,
    /// 1 to 50 steps, run in order; at most 64 KiB of JSON.
    #[schema(min_items = 1, max_items = 50)]
    pub steps: Vec<WorkflowStep>,
}

/// A workflow.
#[derive(ToSchema)]
pub struct Workflow {
    #[schema(minimum = 1)]
    pub id: i64,
    pub name: String,
    pub steps: Vec<WorkflowStep>,
    pub version: i32,
    pub created_at: String,
}

/// The body of `POST /workflows/{id}/executions`.
#[derive(ToSchema)]
pub struct NewExecution {
    /// The execution's input (default `{}`).
    #[schema(nullable = false)]
    pub input: Option<JsonObject>,
    /// Attempts before it fails (default `AGENTS_MAX_ATTEMPTS`).
    #[schema(nullable = false, minimum = 1, maximum = 100)]
    pub max_attempts: Option<i32>,
}

/// Where an execution is.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum ExecutionState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// An execution.
#[derive(ToSchema)]
pub struct Execution {
    #[schema(minimum = 1)]
    pub id: i64,
    pub workflow_id: i64,
    pub state: ExecutionState,
    pub input: JsonObject,
    /// Attempts started so far.
    pub attempt: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    /// Each step's output, in order (once succeeded).
    pub result: Option<Vec<serde_json::Value>>,
    /// Why the last attempt failed, or why it was cancelled.
    pub error: Option<String>,
    pub created_at: String,
    /// When it may be claimed (later than now while a retry waits out its backoff).
    pub run_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// The body of `POST /agents/{id}/memory`.
#[derive(ToSchema)]
pub struct NewMemory {
    /// Any JSON of at most AGENTS_MEMORY_MAX_BYTES (default 256 KiB), no NUL in it.
    pub data: serde_json::Value,
}

/// A memory snapshot.
#[derive(ToSchema)]
pub struct Memory {
    #[schema(minimum = 1)]
    pub id: i64,
    pub agent_id: i64,
    pub data: serde_json::Value,
    pub size_bytes: i32,
    /// RFC 3339, UTC, to the microsecond.
    pub created_at: String,
}

/// A page of an agent's snapshots, latest first.
#[derive(ToSchema)]
pub struct MemoryPage {
    pub items: Vec<Memory>,
    /// The `cursor` of the next (older) page; null on the last.
    pub next_cursor: Option<String>,
}

/// Paging parameters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// `GET /audit/all`'s own filter.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AllAuditParams {
    /// Only rows of this actor (`user:<id>`, `system:executions`).
    #[param(min_length = 1, max_length = 200, pattern = "^[^\\u0000]+$")]
    actor: Option<String>,
}
