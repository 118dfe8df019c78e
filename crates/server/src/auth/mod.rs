//! Accounts, sessions and tokens over HTTP, the current-user extractor every module uses, and
//! the rate limits of the identity routes.
//!
//! | route | limit | what |
//! |---|---|---|
//! | `POST /auth/register` | `RATE_LIMIT_AUTH` per address | create an account; logs it in |
//! | `POST /auth/login` | `RATE_LIMIT_LOGIN` per username and per address | open a session |
//! | `POST /auth/refresh` | `RATE_LIMIT_AUTH` per address | rotate the refresh token |
//! | `POST /auth/revoke` | `RATE_LIMIT_AUTH` per address | revoke an access or refresh token |
//! | `POST /auth/logout` | `RATE_LIMIT_API` per user | end the current session |
//! | `GET /me`, `GET /me/sessions`, `DELETE /me/sessions/{id}` | `RATE_LIMIT_API` per user | |

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cascade_core::config::RateLimit;
use cascade_core::identity::{AuthError, ClientInfo, Decision, Principal, Tier, Tokens, User};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::http::error::{ApiError, set_rate_headers};
use crate::http::extract::JsonBody;
use crate::state::AppState;

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
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Invalid { field, message } => ApiError::BadRequest {
                field: Some(field.to_string()),
                message,
            },
            AuthError::UsernameTaken => ApiError::Conflict(err.to_string()),
            AuthError::BadCredentials | AuthError::Unauthorized(_) | AuthError::RefreshReuse => {
                ApiError::Unauthorized(err.to_string())
            }
            AuthError::TierTooLow { .. } => ApiError::Forbidden(err.to_string()),
            AuthError::NotFound => ApiError::NotFound("not found".into()),
            AuthError::Db(err) => err.into(),
            AuthError::Internal(message) => ApiError::Internal(anyhow::anyhow!(message)),
        }
    }
}

/// The authenticated caller. Extracting it verifies the bearer token and its session (401
/// otherwise) and counts the request against `RATE_LIMIT_API` for that user (429).
pub struct CurrentUser(pub Principal);

impl CurrentUser {
    /// 403 unless the caller's subscription tier is `required` or above.
    pub fn require_tier(&self, required: Tier) -> Result<(), ApiError> {
        Ok(self.0.require_tier(required)?)
    }
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(CurrentUser(principal.clone()));
        }
        let token = bearer_token(&parts.headers)?;
        let principal = state.identity.authenticate(token).await?;
        if let Some(limit) = state.config.auth.api_limit {
            let key = format!("user:{}", principal.user_id);
            enforce(state, parts, "api", &key, limit).await?;
        }
        parts.extensions.insert(principal.clone());
        Ok(CurrentUser(principal))
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer <token>".into()))?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("expected Authorization: Bearer <token>".into()))
}

/// The client's address, as the TCP peer (not `X-Forwarded-For`, which anyone can write).
fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn client_info(parts: &Parts) -> ClientInfo {
    ClientInfo {
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        addr: Some(client_addr(parts)),
    }
}

/// Where the rate-limit decision of a request is left for [`rate_limit_headers`] to report.
#[derive(Clone, Default)]
struct RateSlot(Arc<Mutex<Option<(Decision, String)>>>);

/// Adds `RateLimit-*` headers to every response whose request was counted against a limit.
pub async fn rate_limit_headers(mut request: Request, next: Next) -> Response {
    let slot = RateSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = next.run(request).await;
    let decided = slot.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((decision, policy)) = decided
        && !response.headers().contains_key("ratelimit-limit")
    {
        set_rate_headers(
            response.headers_mut(),
            decision.limit,
            decision.remaining,
            decision.reset,
            &policy,
        );
    }
    response
}

/// Counts one request of `class` by `key`; a 429 when over the limit.
async fn enforce(
    state: &AppState,
    parts: &Parts,
    class: &str,
    key: &str,
    limit: RateLimit,
) -> Result<(), ApiError> {
    let decision = state.limiter.check(class, key, limit).await;
    let policy = format!("{};w={}", decision.limit, limit.period.as_secs().max(1));
    if decision.local {
        tracing::debug!(class, "rate limited locally (Redis unavailable)");
    }
    if !decision.allowed {
        tracing::info!(class, key, "rate limit exceeded");
        return Err(ApiError::RateLimited {
            retry_after: decision.retry_after,
            limit: decision.limit,
            reset: decision.reset,
            policy,
        });
    }
    if let Some(slot) = parts.extensions.get::<RateSlot>() {
        let mut slot = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        // With several limits on one request, report the tightest.
        if slot
            .as_ref()
            .is_none_or(|(d, _)| decision.remaining < d.remaining)
        {
            *slot = Some((decision, policy));
        }
    }
    Ok(())
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
