//! `/consciousness/sessions…`: start a session at a level, change the level, send heartbeats,
//! end it. A session is its user's alone: another user's session id is a 404, as an id nobody
//! has. A level at or above `VERIFICATION_THRESHOLD` makes the session `verified`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cascade_core::cache::Invalidations;
use cascade_core::config::Decimal6;
use cascade_http::{ApiError, CurrentUser, JsonBody};

use super::cache;
use super::model::{self, Level, LevelBody, NewSession, NewSessionBody};
use super::session_queries::{self as queries, Ended, LevelChange, Session};
use super::{Effects, SpaceError, events, write};
use crate::AppModuleState;

/// The session with `verified` set from `threshold` (`VERIFICATION_THRESHOLD`).
fn verified(
    threshold: Decimal6,
    session: Result<Session, SpaceError>,
) -> Result<Session, SpaceError> {
    let mut session = session?;
    session.verified = session.consciousness_level.reaches(threshold);
    Ok(session)
}

fn threshold(state: &AppModuleState) -> Decimal6 {
    state.config.consciousness.verification_threshold
}

/// What ending sessions made stale: each space someone left (its count and participants).
pub fn left_spaces(ended: &[Ended]) -> Invalidations {
    let mut stale = Invalidations::new();
    for space in ended
        .iter()
        .flat_map(|e| e.left.iter().map(|(space, _)| space))
    {
        cache::space_changed(&mut stale, space);
    }
    stale
}

/// `POST /consciousness/sessions`.
#[utoipa::path(post, path = "/consciousness/sessions", tag = "consciousness", security(("bearer" = [])),
    request_body = crate::openapi::NewConsciousnessSession,
    responses(
        (status = 201, description = "The session, active, with its `session_token` (shown once)", body = crate::openapi::ConsciousnessSession),
        (status = 400, description = "A field is malformed (named in `field`); nothing is written"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such space"),
        (status = 409, description = "The space is closed, or the caller has an active session for it (or bound to no space) already"),
    )
)]
pub async fn start(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    JsonBody(body): JsonBody<NewSessionBody>,
) -> Result<Response, ApiError> {
    let new = NewSession::parse(&body)?;
    let user = me.user_id;
    let threshold = threshold(&state);
    let session = write(
        &state,
        Box::new(move |tx| {
            Box::pin(
                async move { verified(threshold, queries::start_session(tx, user, &new).await) },
            )
        }),
        |session: &Session| Effects {
            stale: Invalidations::new(),
            events: events::session_started(session),
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

/// `PATCH /consciousness/sessions/{id}` `{"consciousness_level": "0.90"}`.
#[utoipa::path(patch, path = "/consciousness/sessions/{id}", tag = "consciousness", security(("bearer" = [])),
    params(crate::openapi::SessionPath),
    request_body = crate::openapi::LevelChange,
    responses(
        (status = 200, description = "The session at its new level (counts as activity)", body = crate::openapi::ConsciousnessSession),
        (status = 400, description = "The level is malformed; nothing is written"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "The caller has no session with this id"),
        (status = 409, description = "The session has ended"),
    )
)]
pub async fn set_level(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<LevelBody>,
) -> Result<Response, ApiError> {
    let id = model::session_id(&id)?;
    let level = Level::from_json("consciousness_level", &body.consciousness_level)?;
    let user = me.user_id;
    let threshold = threshold(&state);
    let change = write(
        &state,
        Box::new(move |tx| {
            Box::pin(async move {
                let change = queries::set_level(tx, user, id, level).await?;
                Ok(LevelChange {
                    session: verified(threshold, Ok(change.session))?,
                    before: change.before,
                })
            })
        }),
        move |change: &LevelChange| Effects {
            stale: Invalidations::new(),
            events: events::level_changed(
                &change.session,
                &change.before.to_string(),
                change.before.reaches(threshold),
            ),
        },
    )
    .await?;
    Ok(Json(change.session).into_response())
}

/// `POST /consciousness/sessions/{id}/heartbeat`.
#[utoipa::path(post, path = "/consciousness/sessions/{id}/heartbeat", tag = "consciousness", security(("bearer" = [])),
    params(crate::openapi::SessionPath),
    responses(
        (status = 200, description = "The session, its `last_activity` now", body = crate::openapi::ConsciousnessSession),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "The caller has no session with this id"),
        (status = 409, description = "The session has ended (idle sessions end by themselves)"),
    )
)]
pub async fn heartbeat(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = model::session_id(&id)?;
    let user = me.user_id;
    let threshold = threshold(&state);
    let session = write(
        &state,
        Box::new(move |tx| {
            Box::pin(async move { verified(threshold, queries::heartbeat(tx, user, id).await) })
        }),
        |_: &Session| Effects::default(),
    )
    .await?;
    Ok(Json(session).into_response())
}

/// `DELETE /consciousness/sessions/{id}`.
#[utoipa::path(delete, path = "/consciousness/sessions/{id}", tag = "consciousness", security(("bearer" = [])),
    params(crate::openapi::SessionPath),
    responses(
        (status = 204, description = "The session has ended (whether now or before); its user has left the spaces joined through it"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "The caller has no session with this id"),
    )
)]
pub async fn end(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = model::session_id(&id)?;
    let user = me.user_id;
    write(
        &state,
        Box::new(move |tx| Box::pin(async move { queries::end_session(tx, user, id).await })),
        |ended: &Option<Ended>| Effects {
            stale: left_spaces(ended.as_slice()),
            events: events::sessions_ended(ended.as_slice(), "ended"),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
