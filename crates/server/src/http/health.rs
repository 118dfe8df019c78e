//! `GET /health` (overall, public) and `GET /health/db` (PostgreSQL, Redis and the cache in
//! detail, for operators).
//!
//! PostgreSQL is the truth, so without it Cascade cannot serve: 503. Redis is a cache; without
//! it Cascade serves from PostgreSQL and says "degraded" with a 200.
//!
//! `/health/db` shows where the database and Redis are, the pool's internals and the cache's
//! namespaces: it answers only `Authorization: Bearer <ADMIN_TOKEN>` (401 otherwise), and with
//! no `ADMIN_TOKEN` configured it is closed to everyone (403). `/health` tells a load balancer
//! all it needs and stays public.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use cascade_http::AppState;

/// How long a health probe may take before the dependency counts as down.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/health/db", get(health_db))
}

async fn redis_status(state: &AppState) -> Value {
    match &state.redis {
        None => json!({ "status": "disabled", "configured": false }),
        Some(redis) => {
            let health = redis.health().await;
            json!({
                "status": if health.up { "up" } else { "down" },
                "configured": true,
                "url": redis.display(),
                "latency_ms": health.latency_ms,
                "error": health.error,
            })
        }
    }
}

/// The read replicas (`DATABASE_REPLICA_URLS`): each one's rotation, lag and pool. A replica
/// out of rotation does not make Cascade unhealthy: its reads go to the primary.
fn replicas_status(state: &AppState) -> Value {
    match state.db.replicas() {
        None => json!({ "configured": false }),
        Some(replicas) => {
            // One snapshot, so the count agrees with the list.
            let health = replicas.health();
            json!({
                "configured": true,
                "max_lag_s": replicas.max_lag().as_secs_f64(),
                "timeout_s": replicas.timeout().as_secs_f64(),
                "in_rotation": health.iter().filter(|r| r.in_rotation).count(),
                "replicas": health,
            })
        }
    }
}

fn overall(pg_up: bool, redis: &Value) -> (StatusCode, &'static str) {
    match (pg_up, redis["status"].as_str()) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "down"),
        (true, Some("down")) => (StatusCode::OK, "degraded"),
        (true, _) => (StatusCode::OK, "ok"),
    }
}

#[tracing::instrument(skip_all)]
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "PostgreSQL is up (`degraded`: Redis is down)", body = crate::http::openapi::Health), (status = 503, description = "PostgreSQL is down", body = crate::http::openapi::Health))
)]
async fn health(State(state): State<AppState>) -> Response {
    let (pg, redis) = tokio::join!(state.db.health(PROBE_DEADLINE), redis_status(&state));
    let (status, word) = overall(pg.up, &redis);
    let body = json!({
        "status": word,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "postgres": if pg.up { "up" } else { "down" },
        "redis": redis["status"],
    });
    (status, Json(body)).into_response()
}

#[tracing::instrument(skip_all)]
#[utoipa::path(get, path = "/health/db", tag = "operations", security(("admin" = [])),
    responses((status = 200, description = "PostgreSQL, Redis and the cache engine in detail", body = Object), (status = 401, description = "No or wrong operator token (ADMIN_TOKEN)"), (status = 403, description = "Closed: ADMIN_TOKEN is not configured"), (status = 503, description = "PostgreSQL is down", body = Object))
)]
async fn health_db(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = cascade_http::auth::require_admin(&state, &headers) {
        return refused.into_response();
    }
    let (pg, redis) = tokio::join!(state.db.health(PROBE_DEADLINE), redis_status(&state));
    let (status, word) = overall(pg.up, &redis);
    let body = json!({
        "status": word,
        "postgres": {
            "status": if pg.up { "up" } else { "down" },
            "address": state.db.address(),
            "latency_ms": pg.latency_ms,
            "error": pg.error,
            "pool": pg.pool,
            "pooler": pg.pooler,
        },
        "replicas": replicas_status(&state),
        "redis": redis,
        "upstreams": cascade_core::metrics::upstream_breakers()
            .into_iter()
            .map(|(name, state)| json!({
                "name": name,
                "breaker": match state as u8 { 0 => "closed", 1 => "half-open", _ => "open" },
            }))
            .collect::<Vec<_>>(),
        "cache": {
            "backend": format!("{:?}", state.config.cache.backend).to_lowercase(),
            "breaker": state.cache.breaker_state(),
            "namespaces": state.cache.stats().iter().map(|ns| {
                let mut value = serde_json::to_value(ns).unwrap_or_default();
                value["hit_ratio"] = json!(ns.hit_ratio());
                value
            }).collect::<Vec<_>>(),
        },
    });
    (status, Json(body)).into_response()
}
