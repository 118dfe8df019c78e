//! `/spaces…`: create, read, list, join, leave, close, participants.
//!
//! Reads are public and cache-aside (`cache.rs`); writes need a bearer token, validate all of
//! their input before PostgreSQL sees any of it, and remove what they made stale before they
//! answer.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cascade_core::cache::Invalidations;
use cascade_http::{ApiError, CurrentUser, JsonBody};
use serde_json::json;

use super::cache::{self, SPACE_LISTS, SPACE_PARTICIPANTS, SPACES};
use super::model::{ListParams, ListQuery, NewSpace, NewSpaceBody, SpaceId};
use super::queries::{self, Closed, Joined, Space};
use super::{Effects, SpaceError, events, json_response, to_json, write};
use crate::AppModuleState;
use crate::tiers::{self, Feature};

fn space_path(raw: &str) -> Result<SpaceId, ApiError> {
    Ok(SpaceId::parse("space_id", raw)?)
}

/// `POST /spaces`: a paid tier only (see `tiers.rs`).
#[utoipa::path(post, path = "/spaces", tag = "spaces", security(("bearer" = [])),
    request_body = crate::openapi::NewSpace,
    responses(
        (status = 201, description = "The space, with no participants", body = crate::openapi::Space),
        (status = 400, description = "A field is malformed (named in `field`); nothing is written"),
        (status = 401, description = "No valid access token"),
        (status = 403, description = "The account's subscription tier does not include creating spaces"),
        (status = 409, description = "The space id is taken"),
    )
)]
pub async fn create(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    JsonBody(body): JsonBody<NewSpaceBody>,
) -> Result<Response, ApiError> {
    let space = NewSpace::parse(body)?;
    let user = me.user_id;
    let creator = me.username.to_ascii_lowercase();
    let created = write(
        &state,
        Box::new(move |tx| {
            Box::pin(async move {
                let tier = queries::tier(tx, user).await?;
                tiers::check(Feature::CreateSpace, &tier)
                    .map_err(|refused| SpaceError::Forbidden(refused.to_string()))?;
                queries::insert_space(tx, user, &space).await
            })
        }),
        move |space: &Space| {
            let mut stale = Invalidations::new();
            // A read of this id before it existed may have cached "no such space".
            cache::space_changed(&mut stale, &space.space_id);
            cache::listed(&mut stale, &creator, false);
            Effects {
                stale,
                events: vec![events::space_created(space)],
            }
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// A space's cached entry in `namespace` (404 when there is no such space): what `load`
/// reads, cache-aside.
async fn by_space<F, Fut>(
    state: &AppModuleState,
    namespace: &str,
    raw: &str,
    load: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(cascade_core::db::Conn, SpaceId) -> Fut,
    Fut: Future<Output = Result<Option<Vec<u8>>, SpaceError>>,
{
    let id = space_path(raw)?;
    let db = state.app.db.clone();
    let key = id.clone();
    let (body, _) = state
        .app
        .cache
        .get_or_load_body(namespace, id.as_str(), &[], move || async move {
            load(db.conn().await?, key).await
        })
        .await?;
    let body = body.ok_or_else(|| SpaceError::NotFound(format!("no space {:?}", id.as_str())))?;
    Ok(json_response(&body))
}

/// `GET /spaces/{space_id}`.
#[utoipa::path(get, path = "/spaces/{space_id}", tag = "spaces",
    params(crate::openapi::SpacePath),
    responses(
        (status = 200, description = "The space", body = crate::openapi::Space),
        (status = 400, description = "Not a space id"),
        (status = 404, description = "No such space"),
    )
)]
pub async fn get(
    State(state): State<AppModuleState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    by_space(&state, SPACES, &id, |conn, id| async move {
        queries::space(&conn, &id)
            .await?
            .map(|space| to_json(&space))
            .transpose()
    })
    .await
}

/// `GET /spaces?active=&creator=&limit=&cursor=`.
#[utoipa::path(get, path = "/spaces", tag = "spaces",
    params(crate::openapi::SpaceListParams),
    responses(
        (status = 200, description = "A page of spaces, newest first", body = crate::openapi::SpacePage),
        (status = 400, description = "A parameter is malformed (named in `field`)"),
    )
)]
pub async fn list(
    State(state): State<AppModuleState>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let query = ListQuery::parse(&params)?;
    let db = state.app.db.clone();
    let tags = [cache::list_tag(&query)];
    let key = query.key();
    let (body, _) = state
        .app
        .cache
        .get_or_load_body(SPACE_LISTS, &key, &tags, move || async move {
            let conn = db.conn().await?;
            let page = queries::list(&conn, &query).await?;
            to_json(&page).map(Some)
        })
        .await?;
    let body = body.ok_or_else(|| SpaceError::Internal("a page cannot be absent".into()))?;
    Ok(json_response(&body))
}

/// `GET /spaces/{space_id}/participants`.
#[utoipa::path(get, path = "/spaces/{space_id}/participants", tag = "spaces",
    params(crate::openapi::SpacePath),
    responses(
        (status = 200, description = "Who is in the space, in the order they joined", body = crate::openapi::Participants),
        (status = 400, description = "Not a space id"),
        (status = 404, description = "No such space"),
    )
)]
pub async fn participants(
    State(state): State<AppModuleState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    by_space(&state, SPACE_PARTICIPANTS, &id, |conn, id| async move {
        queries::participants(&conn, &id)
            .await?
            .map(|list| to_json(&list))
            .transpose()
    })
    .await
}

/// `POST /spaces/{space_id}/join`.
#[utoipa::path(post, path = "/spaces/{space_id}/join", tag = "spaces", security(("bearer" = [])),
    params(crate::openapi::SpacePath),
    responses(
        (status = 201, description = "Joined; the space as it is now", body = crate::openapi::Space),
        (status = 200, description = "A participant already; the space as it is", body = crate::openapi::Space),
        (status = 400, description = "Not a space id"),
        (status = 401, description = "No valid access token"),
        (status = 403, description = "No active consciousness session for this space, or its level is below the space's threshold (the message says which)"),
        (status = 404, description = "No such space"),
        (status = 409, description = "The space is full (the message names its limit) or closed"),
    )
)]
pub async fn join(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = space_path(&id)?;
    let user = me.user_id;
    let username = me.username;
    let joined = write(
        &state,
        Box::new(move |tx| Box::pin(async move { queries::join(tx, user, &id).await })),
        move |joined: &Joined| {
            let mut effects = Effects::default();
            if joined.new {
                cache::space_changed(&mut effects.stale, &joined.space.space_id);
                effects
                    .events
                    .push(events::space_joined(&joined.space, &username));
            }
            effects
        },
    )
    .await?;
    let status = if joined.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(joined.space)).into_response())
}

/// `POST /spaces/{space_id}/leave`.
#[utoipa::path(post, path = "/spaces/{space_id}/leave", tag = "spaces", security(("bearer" = [])),
    params(crate::openapi::SpacePath),
    responses(
        (status = 204, description = "The caller is not in the space (whether they were or not)"),
        (status = 400, description = "Not a space id"),
        (status = 401, description = "No valid access token"),
        (status = 404, description = "No such space"),
    )
)]
pub async fn leave(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = space_path(&id)?;
    let user = me.user_id;
    let username = me.username;
    let key = id.clone();
    write(
        &state,
        Box::new(move |tx| Box::pin(async move { queries::leave(tx, user, &key).await })),
        move |left: &bool| {
            let mut effects = Effects::default();
            if *left {
                cache::space_changed(&mut effects.stale, id.as_str());
                effects
                    .events
                    .push(events::space_left(id.as_str(), user, &username, "left"));
            }
            effects
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /spaces/{space_id}/close`: its creator only.
#[utoipa::path(post, path = "/spaces/{space_id}/close", tag = "spaces", security(("bearer" = [])),
    params(crate::openapi::SpacePath),
    responses(
        (status = 200, description = "Closed (also when it was already); every participant has left", body = crate::openapi::Space),
        (status = 400, description = "Not a space id"),
        (status = 401, description = "No valid access token"),
        (status = 403, description = "Not the space's creator; nothing changes"),
        (status = 404, description = "No such space"),
    )
)]
pub async fn close(
    State(state): State<AppModuleState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = space_path(&id)?;
    let user = me.user_id;
    let creator = me.username.to_ascii_lowercase();
    let closed = write(
        &state,
        Box::new(move |tx| Box::pin(async move { queries::close(tx, user, &id).await })),
        move |closed: &Closed| {
            let mut effects = Effects::default();
            if closed.now {
                cache::space_changed(&mut effects.stale, &closed.space.space_id);
                cache::listed(&mut effects.stale, &creator, true);
                effects.events = events::space_closed(&closed.space.space_id, closed.left);
            }
            effects
        },
    )
    .await?;
    Ok(Json(json!(closed.space)).into_response())
}
