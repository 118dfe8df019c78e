//! Accounts, sessions and tokens over HTTP, and the rate limits of the identity routes (the
//! current-user extractor every module uses lives in `cascade-http`). An address is an IPv4
//! address or an IPv6 /64.
//!
//! | route | limit | what |
//! |---|---|---|
//! | `POST /auth/register` | `RATE_LIMIT_AUTH` per address | create an account; logs it in |
//! | `POST /auth/login` | `RATE_LIMIT_AUTH` per address, `RATE_LIMIT_LOGIN` per (username, address), the username's backoff | open a session |
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
use cascade_core::identity::{AuthError, Tokens, User, Username, check_login_password};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use cascade_http::AppState;
use cascade_http::JsonBody;
use cascade_http::auth::{admit_login, client_info, client_network, enforce, record_login};
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[schema(
        min_length = 3,
        max_length = 32,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )]
    username: String,
    #[schema(min_length = 8, max_length = 256, pattern = r"^[^\x00]*$")]
    password: String,
    #[serde(default)]
    #[schema(format = Email, max_length = 254)]
    email: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    #[schema(
        min_length = 3,
        max_length = 32,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )]
    username: String,
    #[schema(max_length = 256, pattern = r"^[^\x00]*$")]
    password: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
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

#[utoipa::path(post, path = "/auth/register", tag = "identity", request_body = RegisterBody,
    responses((status = 201, description = "The account, logged in", body = crate::http::openapi::Authenticated), (status = 409, description = "The username is taken"), (status = 429, description = "Over RATE_LIMIT_AUTH for this address"))
)]
async fn register(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(limit) = state.config.auth.auth_limit {
        let key = format!("addr:{}", client_network(&parts));
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

#[utoipa::path(post, path = "/auth/login", tag = "identity", request_body = LoginBody,
    responses((status = 200, body = crate::http::openapi::Authenticated), (status = 401, description = "Wrong username or password"), (status = 429, description = "Over RATE_LIMIT_LOGIN"))
)]
async fn login(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Authenticated>, ApiError> {
    // Malformed input is refused before anything is counted or looked up.
    let username = Username::parse(&body.username)?;
    check_login_password(&body.password)?;
    admit_login(&state, &parts, &username).await?;
    let result = state
        .identity
        .login(&username, &body.password, &client_info(&parts))
        .await;
    match &result {
        Ok(_) => record_login(&state, &parts, &username, true).await,
        Err(AuthError::BadCredentials) => record_login(&state, &parts, &username, false).await,
        Err(_) => {}
    }
    let (user, tokens) = result?;
    Ok(Json(Authenticated { user, tokens }))
}

#[utoipa::path(post, path = "/auth/refresh", tag = "identity", request_body = RefreshBody,
    responses((status = 200, description = "A new pair; the presented refresh token is spent", body = crate::http::openapi::Tokens), (status = 401, description = "Unknown, expired or reused refresh token"), (status = 429, description = "Over RATE_LIMIT_AUTH for this address"))
)]
async fn refresh(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<RefreshBody>,
) -> Result<Json<Tokens>, ApiError> {
    if let Some(limit) = state.config.auth.auth_limit {
        let key = format!("addr:{}", client_network(&parts));
        enforce(&state, &parts, "auth", &key, limit).await?;
    }
    Ok(Json(state.identity.refresh(&body.refresh_token).await?))
}

/// RFC 7009: revokes an access token (its `jti`) or a refresh token (its session). Unknown
/// tokens are not an error, so the answer reveals nothing.
#[utoipa::path(post, path = "/auth/revoke", tag = "identity", request_body = RevokeBody,
    responses((status = 200, description = "Revoked, or unknown (RFC 7009)", body = crate::http::openapi::Revoked), (status = 429, description = "Over RATE_LIMIT_AUTH for this address"))
)]
async fn revoke(
    State(state): State<AppState>,
    Meta(parts): Meta,
    JsonBody(body): JsonBody<RevokeBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(limit) = state.config.auth.auth_limit {
        let key = format!("addr:{}", client_network(&parts));
        enforce(&state, &parts, "auth", &key, limit).await?;
    }
    state.identity.revoke_any(&body.token).await?;
    Ok(Json(json!({ "revoked": true })))
}

#[utoipa::path(post, path = "/auth/logout", tag = "identity", security(("bearer" = [])),
    responses((status = 204, description = "The session is ended"))
)]
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

#[utoipa::path(get, path = "/me", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = crate::http::openapi::Me))
)]
async fn me(
    State(state): State<AppState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = state.identity.user(me.user_id).await?;
    Ok(Json(json!({ "user": user, "session_id": me.session_id })))
}

#[utoipa::path(get, path = "/me/sessions", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = crate::http::openapi::Sessions))
)]
async fn my_sessions(
    State(state): State<AppState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sessions = state.identity.sessions(me.user_id, me.session_id).await?;
    Ok(Json(json!({ "sessions": sessions })))
}

/// Ends one of the caller's sessions. Another user's session is a 404, as if it did not exist.
#[utoipa::path(delete, path = "/me/sessions/{id}", tag = "identity", security(("bearer" = [])),
    params(("id" = String, Path, format = "uuid", description = "A session id of `GET /me/sessions`")),
    responses((status = 204, description = "The session is ended"), (status = 404, description = "No such session of the caller's"))
)]
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
