//! `GET /citizens/{username}`: a Venice citizen's ledger, cached in namespace `venice`
//! (300 s), served stale within `VENICE_STALE_IF_ERROR` while Venice fails.
//!
//! The body wraps Venice's answer as it came: `{"username", "stale", "age", "fetched_at_ms",
//! "ledger"}`. A stale answer also carries `Warning: 110 - "Response is Stale"`; every answer
//! carries `Age` (seconds since Venice gave it).

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use cascade_http::ApiError;

use crate::AppModuleState;
use crate::venice::{self, VeniceUsername};

/// `GET /citizens/{username}`.
#[utoipa::path(get, path = "/citizens/{username}", tag = "citizens",
    params(("username" = String, Path, description = "A Venice citizen username", min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")),
    responses(
        (status = 200, description = "The citizen's ledger, as Venice gave it", body = crate::openapi::Citizen,
            headers(("Age" = i64, description = "Seconds since Venice gave this answer"), ("Warning" = String, description = "`110 - \"Response is Stale\"` when `stale` is true"))),
        (status = 404, description = "Venice knows no such citizen"),
        (status = 503, description = "Venice is unavailable and no copy younger than VENICE_STALE_IF_ERROR is cached (Retry-After)"),
    )
)]
pub async fn citizen(
    State(state): State<AppModuleState>,
    Path(username): Path<String>,
) -> Result<Response, ApiError> {
    let username = VeniceUsername::parse("username", &username)?;
    let fetched = venice::ledger(&state.venice, &username)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("Venice knows no citizen {:?}", username.as_str()))
        })?;
    let age = fetched.age().as_secs();
    let data = fetched.data();
    let mut body = Vec::with_capacity(data.len() + 128);
    body.extend_from_slice(b"{\"username\":\"");
    // Parsed usernames need no escaping (ASCII letters, digits, `_`, `.`, `-`).
    body.extend_from_slice(username.as_str().as_bytes());
    body.extend_from_slice(b"\",\"stale\":");
    body.extend_from_slice(if fetched.stale { b"true" } else { b"false" });
    body.extend_from_slice(
        format!(
            ",\"age\":{age},\"fetched_at_ms\":{},\"ledger\":",
            fetched.fetched_at_ms
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.push(b'}');
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::AGE, HeaderValue::from(age));
    if fetched.stale {
        headers.insert(
            header::WARNING,
            HeaderValue::from_static("110 - \"Response is Stale\""),
        );
    }
    Ok(response)
}
