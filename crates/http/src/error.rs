//! The one error type of the HTTP layer.
//!
//! Every error a client can see has a stable machine `code`, an HTTP status and a message, and
//! renders as `{"error": {"code", "message"}}`. Internal causes are logged with the request's
//! span (which carries the request id), never sent to the client.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cascade_core::db::DbError;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` names the offending input when there is one.
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    /// No credentials, or credentials that are invalid, expired or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed (e.g. a subscription tier too low).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed, but refused by a rule (an amount below a minimum, an idempotency key
    /// reused with another body).
    #[error("{0}")]
    Unprocessable(String),
    /// Over a rate limit; carries what the `Retry-After` and `RateLimit-*` headers say.
    #[error("too many requests: retry in {}s", retry_after.as_secs().max(1))]
    RateLimited {
        retry_after: Duration,
        limit: u32,
        reset: Duration,
        policy: String,
    },
    /// A dependency (PostgreSQL) cannot serve right now; the client may retry after a while.
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    /// A feature whose settings are missing on this server (Stripe billing without a key).
    #[error("{0}")]
    BillingNotConfigured(String),
    /// Something we did not expect; logged, and the client gets a generic message.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    /// `(status, code)` — the table a client can rely on.
    fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::BillingNotConfigured(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "billing_not_configured")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unavailable(message) | DbError::Unreachable { last: message, .. } => {
                ApiError::Unavailable {
                    message,
                    retry_after: Duration::from_secs(1),
                }
            }
            // The connection died under the statement (PostgreSQL stopping or restarting): the
            // write is not acknowledged, and a retry shortly is the right move.
            lost if lost.is_unavailable() => {
                tracing::warn!(error = %lost, "PostgreSQL connection lost");
                ApiError::Unavailable {
                    message: "PostgreSQL is unavailable".into(),
                    retry_after: Duration::from_secs(1),
                }
            }
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        let message = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "internal error");
                "internal error; see the server log for this request id".to_string()
            }
            other => other.to_string(),
        };
        let mut body = json!({ "error": { "code": code, "message": message } });
        if let ApiError::BadRequest {
            field: Some(field), ..
        } = &self
        {
            body["error"]["field"] = json!(field);
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unavailable { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            ApiError::RateLimited {
                retry_after,
                limit,
                reset,
                policy,
            } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(ceil_secs(*retry_after)),
                );
                set_rate_headers(headers, *limit, 0, *reset, policy);
            }
            _ => {}
        }
        response
    }
}

/// The machine code used for a bare status (errors produced by middleware, not handlers).
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => "timeout",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` and `RateLimit-Reset` carry.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_micros().div_ceil(1_000_000).max(1) as u64
}

/// The `RateLimit-*` headers (IETF draft "RateLimit header fields for HTTP").
pub fn set_rate_headers(
    headers: &mut axum::http::HeaderMap,
    limit: u32,
    remaining: u32,
    reset: Duration,
    policy: &str,
) {
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(ceil_secs(reset)));
    if let Ok(policy) = HeaderValue::from_str(policy) {
        headers.insert("ratelimit-policy", policy);
    }
}
