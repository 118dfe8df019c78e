//! The authenticated caller ([`CurrentUser`]) every module's handlers take, and the rate
//! limits it enforces (`RATE_LIMIT_API` per user), with the middleware that reports them as
//! `RateLimit-*` headers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRef, FromRequestParts, OptionalFromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use cascade_core::config::RateLimit;
use cascade_core::identity::ratelimit::client_network as network_of;
use cascade_core::identity::{AuthError, ClientInfo, Decision, Principal, Username};

use crate::error::{ApiError, set_rate_headers};
use crate::state::AppState;

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
            AuthError::NotFound => ApiError::NotFound("not found".into()),
            AuthError::Db(err) => err.into(),
            AuthError::Internal(message) => ApiError::Internal(anyhow::anyhow!(message)),
        }
    }
}

/// The authenticated caller. Extracting it verifies the bearer token and its session (401
/// otherwise) and counts the request against `RATE_LIMIT_API` for that user (429).
pub struct CurrentUser(pub Principal);

impl<S> FromRequestParts<S> for CurrentUser
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // A second extraction in one request reuses the first's principal (and its count).
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(CurrentUser(principal.clone()));
        }
        let state = &AppState::from_ref(state);
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

/// `Option<CurrentUser>`: `None` for a request without `Authorization` (a public route read
/// anonymously); with the header, the same checks as [`CurrentUser`] (a bad or revoked token
/// is a 401, not an anonymous read).
impl<S> OptionalFromRequestParts<S> for CurrentUser
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Option<Self>, ApiError> {
        if !parts.headers.contains_key(header::AUTHORIZATION) {
            return Ok(None);
        }
        <CurrentUser as FromRequestParts<S>>::from_request_parts(parts, state)
            .await
            .map(Some)
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
pub fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The client's network, as per-address rate limits key it: the IPv4 address, or the /64 of
/// an IPv6 one ([`cascade_core::identity::ratelimit::client_network`]).
pub fn client_network(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| network_of(addr.ip()))
        .unwrap_or_else(|| "unknown".into())
}

pub fn client_info(parts: &Parts) -> ClientInfo {
    ClientInfo {
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        addr: Some(client_addr(parts)),
    }
}

/// Where the rate-limit decision of a request is left for the server's outermost layer to
/// report as `RateLimit-*` headers. That layer attaches one only to requests a limit can apply
/// to ([`enforce`] says which), so public reads pay nothing for it.
#[derive(Clone, Default)]
pub struct RateSlot(Arc<Mutex<Option<(Decision, String)>>>);

impl RateSlot {
    /// A new slot, also put in `extensions` for [`enforce`] to find.
    pub fn attach(extensions: &mut axum::http::Extensions) -> RateSlot {
        let slot = RateSlot::default();
        extensions.insert(slot.clone());
        slot
    }

    /// Adds the `RateLimit-*` headers of the decision left here, if any, unless the response
    /// has them already (a 429 sets its own).
    pub fn report(&self, response: &mut Response) {
        let decided = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
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
    }
}

/// Counts a login attempt by `user` from this request's client network before its password
/// is checked (`cascade_core::identity::login_limit` explains the three budgets): per network
/// (`RATE_LIMIT_AUTH`), per (username, network) pair (`RATE_LIMIT_LOGIN`), and the username's
/// backoff for networks it has not logged in from. A 429 when over any.
pub async fn admit_login(state: &AppState, parts: &Parts, user: &Username) -> Result<(), ApiError> {
    let net = client_network(parts);
    let auth = &state.config.auth;
    if let Some(limit) = auth.auth_limit {
        enforce(state, parts, "login", &format!("addr:{net}"), limit).await?;
    }
    if let Some(limit) = auth.login_limit {
        let pair = format!("pair:{}@{net}", user.key());
        enforce(state, parts, "login", &pair, limit).await?;
    }
    if let Some(policy) = auth.login_backoff() {
        let decision = state.limiter.login_admit(user, &net, policy).await;
        if !decision.allowed {
            tracing::info!(user = user.key(), "login backoff: attempt held back");
            return Err(ApiError::RateLimited {
                retry_after: decision.retry_after,
                limit: decision.limit,
                reset: decision.reset,
                policy: format!("{};w={}", policy.free, policy.forget.as_secs().max(1)),
            });
        }
    }
    Ok(())
}

/// Reports how a login admitted by [`admit_login`] ended: a wrong password counts towards the
/// username's backoff; a success resets it and makes the client's network known.
pub async fn record_login(state: &AppState, parts: &Parts, user: &Username, succeeded: bool) {
    let Some(policy) = state.config.auth.login_backoff() else {
        return;
    };
    let net = client_network(parts);
    if succeeded {
        state.limiter.login_succeeded(user, &net).await;
    } else {
        state.limiter.login_failed(user, &net, policy).await;
    }
}

/// Counts one request of `class` by `key`; a 429 when over the limit.
///
/// The decision's headers reach the response only through a [`RateSlot`], which the server
/// attaches to requests that carry `Authorization` or use a method other than `GET`, `HEAD`
/// and `OPTIONS`: a limit on any other request would be enforced but not reported.
pub async fn enforce(
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
