//! `GET /dashboard/statements`: PostgreSQL's slowest statements in this database, from
//! `pg_stat_statements` (seed 002's troubleshooting), for the dashboard's table. Operators
//! only (`ADMIN_TOKEN`, like `/health/db`): statement texts show the schema and, for a
//! statement sent without parameters, its values.
//!
//! The extension needs the server's `shared_preload_libraries` (a restart) and a `CREATE
//! EXTENSION pg_stat_statements` in the database; Cascade does neither itself. Without them the
//! answer is a 200 with `"status": "unavailable"` and PostgreSQL's reason, so the dashboard
//! can say what to do.

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cascade_http::AppState;
use cascade_http::error::ApiError;
use serde::Deserialize;
use serde_json::json;

/// Statements listed when the request does not say.
const DEFAULT_LIMIT: i64 = 10;
const MAX_LIMIT: i64 = 100;
/// Characters of a statement's text shown; longer texts are cut (`truncated`).
const TEXT_MAX: i32 = 300;

pub fn router() -> Router<AppState> {
    Router::new().route("/dashboard/statements", get(statements))
}

/// Read as text, so that a bad value gets this endpoint's 400 naming the field.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatementsQuery {
    /// How many statements, 1 to 100 (default 10).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `mean` (default: the slowest per call) or `total` (the most time overall).
    #[param(pattern = "^(mean|total)$")]
    order: Option<String>,
}

#[tracing::instrument(skip_all)]
#[utoipa::path(get, path = "/dashboard/statements", tag = "operations", security(("admin" = [])), params(StatementsQuery),
    responses((status = 200, description = "The slowest statements of this database (`status: available`), or `status: unavailable` with the reason when pg_stat_statements is not loaded or not created", body = Object), (status = 400, description = "`limit` or `order` out of range"), (status = 401, description = "No or wrong operator token (ADMIN_TOKEN)"), (status = 403, description = "Closed: ADMIN_TOKEN is not configured"), (status = 503, description = "PostgreSQL is down"))
)]
async fn statements(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<StatementsQuery>,
) -> Result<Response, ApiError> {
    cascade_http::auth::require_admin(&state, &headers)?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("limit", format!("limit must be 1 to {MAX_LIMIT}"))
            })?,
    };
    let (order, column) = match query.order.as_deref() {
        None | Some("mean") => ("mean", "mean_exec_time"),
        Some("total") => ("total", "total_exec_time"),
        Some(_) => {
            return Err(ApiError::bad_request(
                "order",
                "order must be mean or total",
            ));
        }
    };
    let conn = state.db.conn().await?;
    let sql = format!(
        // The text is NULL when PostgreSQL could not read its query-text file.
        "SELECT coalesce(left(query, $2), ''), coalesce(length(query) > $2, false), calls,
                total_exec_time, mean_exec_time, rows
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY {column} DESC LIMIT $1"
    );
    let rows = match conn.query(&sql, &[&limit, &TEXT_MAX]).await {
        Ok(rows) => rows,
        Err(err) => {
            // Not created here (42P01), or created but not preloaded (55000): say why.
            let reason = match err.as_db_error() {
                Some(db) if db.code() == &tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
                    "pg_stat_statements is not created in this database: add it to the \
                     server's shared_preload_libraries (a restart), then CREATE EXTENSION \
                     pg_stat_statements"
                        .to_string()
                }
                Some(db) => db.message().to_string(),
                None => return Err(cascade_core::db::DbError::from(err).into()),
            };
            let body = json!({ "status": "unavailable", "reason": reason });
            return Ok(Json(body).into_response());
        }
    };
    let listed: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "query": r.get::<_, String>(0),
                "truncated": r.get::<_, bool>(1),
                "calls": r.get::<_, i64>(2),
                "total_ms": r.get::<_, f64>(3),
                "mean_ms": r.get::<_, f64>(4),
                "rows": r.get::<_, i64>(5),
            })
        })
        .collect();
    Ok(
        Json(json!({ "status": "available", "order": order, "statements": listed }))
            .into_response(),
    )
}
