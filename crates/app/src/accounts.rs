//! Accounts and Venice citizens (seed 001's authentication flow): `POST /me/citizen` links
//! the caller's account to a citizen the Venice ledger knows, `DELETE /me/citizen` unlinks it,
//! and `GET /me` shows the link (`user.venice_username`).
//!
//! A citizen belongs to one account at most. The database decides (the UNIQUE constraint on
//! `cascade_users.venice_username`): of two accounts linking one citizen at once, one gets
//! the link and the other a 409. Nothing is written unless Venice knows the citizen.
//! `GET /me` reads the row (it is not cached) and sessions cache no link, so there is no
//! cached copy to invalidate.
//!
//! A successful link, and an unlink that removed a link, are recorded in the interaction log
//! (`citizen_link`, `citizen_unlink`), off the request path.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cascade_http::{ApiError, CurrentUser, JsonBody};
use serde::Deserialize;
use serde_json::json;
use tokio_postgres::error::SqlState;

use crate::AppModuleState;
use crate::interactions::InteractionKind;
use crate::venice::{self, VeniceUsername};

/// The body of `POST /me/citizen`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    /// A citizen the Venice ledger knows.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
    )]
    pub venice_username: String,
}

/// `POST /me/citizen`.
#[utoipa::path(post, path = "/me/citizen", tag = "citizens", security(("bearer" = [])),
    request_body = LinkBody,
    responses(
        (status = 200, description = "The account is linked to the citizen", body = crate::openapi::CitizenLink),
        (status = 400, description = "The body or the username is malformed"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "Venice knows no such citizen; nothing is written"),
        (status = 409, description = "Another account is linked to this citizen"),
        (status = 503, description = "Venice is unavailable and no recent copy of the citizen's ledger is cached (Retry-After)"),
    )
)]
pub async fn link(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    JsonBody(body): JsonBody<LinkBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let username = VeniceUsername::parse("venice_username", &body.venice_username)?;
    // The ledger must know the citizen (a stale copy within the bound still says so).
    if venice::ledger(&state.venice, &username).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "Venice knows no citizen {:?}",
            username.as_str()
        )));
    }
    let conn = state.app.db.conn().await?;
    let row = conn
        .query_opt(
            "UPDATE cascade_users \
             SET venice_username = $2::text, \
                 venice_linked_at = CASE WHEN venice_username IS DISTINCT FROM $2::text \
                                         THEN now() ELSE venice_linked_at END, \
                 updated_at = now() \
             WHERE id = $1 \
             RETURNING to_char(venice_linked_at AT TIME ZONE 'UTC', \
                               'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            &[&me.user_id, &username.as_str()],
        )
        .await
        .map_err(|err| match err.code() {
            Some(code) if *code == SqlState::UNIQUE_VIOLATION => ApiError::Conflict(format!(
                "citizen {:?} is linked to another account",
                username.as_str()
            )),
            _ => ApiError::from(cascade_core::db::DbError::from(err)),
        })?
        .ok_or_else(|| ApiError::NotFound("no such account".into()))?;
    let linked_at: Option<String> = row.get(0);
    state.interactions.record(
        me.user_id,
        InteractionKind::CitizenLink,
        json!({ "venice_username": username.as_str() }),
    );
    Ok(Json(json!({
        "venice_username": username.as_str(),
        "linked_at": linked_at,
    })))
}

/// `DELETE /me/citizen`.
#[utoipa::path(delete, path = "/me/citizen", tag = "citizens", security(("bearer" = [])),
    responses(
        (status = 204, description = "The account is linked to no citizen (whether it was or not)"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn unlink(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
) -> Result<StatusCode, ApiError> {
    let conn = state.app.db.conn().await?;
    // The old link is read in the statement that removes it (the row as it was, locked).
    let unlinked = conn
        .query_opt(
            "UPDATE cascade_users u \
             SET venice_username = NULL, venice_linked_at = NULL, updated_at = now() \
             FROM (SELECT id, venice_username FROM cascade_users \
                   WHERE id = $1 AND venice_username IS NOT NULL FOR UPDATE) old \
             WHERE u.id = old.id \
             RETURNING old.venice_username::text",
            &[&me.user_id],
        )
        .await
        .map_err(cascade_core::db::DbError::from)?;
    if let Some(row) = unlinked {
        state.interactions.record(
            me.user_id,
            InteractionKind::CitizenUnlink,
            json!({ "venice_username": row.get::<_, String>(0) }),
        );
    }
    Ok(StatusCode::NO_CONTENT)
}
