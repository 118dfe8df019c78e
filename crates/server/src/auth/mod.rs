//! Accounts, sessions and tokens over HTTP, and the rate limits of the identity routes (the
//! current-user extractor every module uses lives in `cascade-http`).
//!
//! | route | limit | what |
//! |---|---|---|
//! | `POST /auth/register` | `RATE_LIMIT_AUTH` per address | create an account; logs it in |
//! | `POST /auth/login` | `RATE_LIMIT_LOGIN` per username and per address | open a session |
//! | `POST /auth/refresh` | `RATE_LIMIT_AUTH` per address | rotate the refresh token |
//! | `POST /auth/revoke` | `RATE_LIMIT_AUTH` per address | revoke an access or refresh token |
//! | `POST /auth/logout` | `RATE_LIMIT_API` per user | end the current session |
//! | `GET /me`, `GET /me/sessions`, `DELETE /me/sessions/{id}` | `RATE_LIMIT_API` per user | |

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use cascade_core::identity::{Tokens, User};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use cascade_http::AppState;
use cascade_http::JsonBody;
use cascade_http::auth::{client_addr, client_info, enforce};
use cascade_http::{ApiError, CurrentUser};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/auth/refresh", post(refresh))
        .route("/auth/revoke", post(revoke))
        .route("/auth/logout", post(logout))
        .route("/me", get(me))
        .route("/me/sessions", get(my_sessions))
        .route("/me/sessions/{id}", delete(end_my_session))
        // Tokens and account data: never stored by a browser or a shared cache.
        .layer(axum::middleware::map_response(no_store))
}

async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// The request's parts without the body, for handlers that also take a JSON body.
struct Meta(Parts);

impl FromRequestParts<AppState> for Meta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        let mut copy = Request::new(());
        *copy.headers_mut() = parts.headers.clone();
        *copy.extensions_mut() = parts.extensions.clone();
        Ok(Meta(copy.into_parts().0))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    username: String,
    password: String,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    token: String,
}

#[derive(Serialize)]
struct Authenticated {
    user: User,
    #[serde(flatten)]
    tokens: Tokens,
}

async fn register(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(limit) = state.config.auth.auth_limit {
        let key = format!("addr:{}", client_addr(&parts));
        enforce(&state, &parts, "auth", &key, limit).await?;
    }
    let (user, tokens) = state
        .identity
        .register(
            &body.username,
            &body.password,
            body.email.as_deref(),
            &client_info(&parts),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(Authenticated { user, tokens })))
}

async fn login(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Authenticated>, ApiError> {
    if let Some(limit) = state.config.auth.login_limit {
        let addr = format!("addr:{}", client_addr(&parts));
        enforce(&state, &parts, "login", &addr, limit).await?;
        let name: String = body.username.to_lowercase().chars().take(64).collect();
        enforce(&state, &parts, "login", &format!("user:{name}"), limit).await?;
    }
    let (user, tokens) = state
        .identity
        .login(&body.username, &body.password, &client_info(&parts))
        .await?;
    Ok(Json(Authenticated { user, tokens }))
}

async fn refresh(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<RefreshBody>,
) -> Result<Json<Tokens>, ApiError> {
    if let Some(limit) = state.config.auth.auth_limit {
        let key = format!("addr:{}", client_addr(&parts));
        enforce(&state, &parts, "auth", &key, limit).await?;
    }
    Ok(Json(state.identity.refresh(&body.refresh_token).await?))
}

/// RFC 7009: revokes an access token (its `jti`) or a refresh token (its session). Unknown
/// tokens are not an error, so the answer reveals nothing.
async fn revoke(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<RevokeBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(limit) = state.config.auth.auth_limit {
        let key = format!("addr:{}", client_addr(&parts));
        enforce(&state, &parts, "auth", &key, limit).await?;
    }
    state.identity.revoke_any(&body.token).await?;
    Ok(Json(json!({ "revoked": true })))
}

async fn logout(
    State(state): State<AppState>,
    CurrentUser(me): CurrentUser,
) -> Result<StatusCode, ApiError> {
    state
        .identity
        .revoke_session(me.user_id, me.session_id, "logout")
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(
    State(state): State<AppState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = state.identity.user(me.user_id).await?;
    Ok(Json(json!({ "user": user, "session_id": me.session_id })))
}

async fn my_sessions(
    State(state): State<AppState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sessions = state.identity.sessions(me.user_id, me.session_id).await?;
    Ok(Json(json!({ "sessions": sessions })))
}

/// Ends one of the caller's sessions. Another user's session is a 404, as if it did not exist.
async fn end_my_session(
    State(state): State<AppState>,
    CurrentUser(me): CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::bad_request("id", "session id must be a UUID"))?;
    if state
        .identity
        .revoke_session(me.user_id, id, "revoked by owner")
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("no such session".into()))
    }
}
