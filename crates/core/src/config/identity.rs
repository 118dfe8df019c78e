//! Identity: sessions, access tokens and their signing secret, rate limits.

use std::time::Duration;

use super::parser::{Parser, SECOND};
use super::values::{Secret, parse_duration};

/// Sessions, tokens and rate limits.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawIdentity {
    /// Sliding lifetime of a login session [default: 1800s].
    #[arg(long, env = "SESSION_DEFAULT_TTL", global = true)]
    pub session_default_ttl: Option<String>,
    /// How often expired sessions are removed [default: 300s].
    #[arg(long, env = "SESSION_CLEANUP_INTERVAL", global = true)]
    pub session_cleanup_interval: Option<String>,
    /// HS256 signing secret of access tokens, at least 32 bytes.
    #[arg(long, env = "JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Lifetime of an access token (JWT) [default: 15m].
    #[arg(long, env = "ACCESS_TOKEN_TTL", global = true)]
    pub access_token_ttl: Option<String>,
    /// `iss` claim of access tokens [default: cascade].
    #[arg(long, env = "JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// `aud` claim of access tokens [default: cascade-api].
    #[arg(long, env = "JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Login attempts allowed per username and per client address, as N/period [default: 5/1m].
    #[arg(long, env = "RATE_LIMIT_LOGIN", global = true)]
    pub rate_limit_login: Option<String>,
    /// Registrations and token refreshes per client address, as N/period [default: 20/1m].
    #[arg(long, env = "RATE_LIMIT_AUTH", global = true)]
    pub rate_limit_auth: Option<String>,
    /// Authenticated API calls per user, as N/period, or off [default: 100/1s].
    #[arg(long, env = "RATE_LIMIT_API", global = true)]
    pub rate_limit_api: Option<String>,
}

/// Sessions, tokens and rate limits of the identity layer.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Sliding lifetime of a login session.
    pub session_default_ttl: Duration,
    pub session_cleanup_interval: Duration,
    /// None: tokens are signed with a random per-process key (logged as a warning).
    pub jwt_secret: Option<Secret>,
    pub access_token_ttl: Duration,
    pub issuer: String,
    pub audience: String,
    /// Per username and, separately, per client address.
    pub login_limit: Option<RateLimit>,
    /// Registration and refresh, per client address.
    pub auth_limit: Option<RateLimit>,
    /// Authenticated calls, per user.
    pub api_limit: Option<RateLimit>,
}

/// `count` requests per `period`, with a burst of `count`. Parsed from `N/period` (`5/1m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}s", self.count, self.period.as_secs_f64())
    }
}

impl AuthConfig {
    pub(super) fn parse(p: &mut Parser, raw: &RawIdentity) -> AuthConfig {
        let jwt_secret = p.secret(&raw.jwt_secret);
        if let Some(secret) = &jwt_secret
            && secret.expose().len() < 32
        {
            p.fail(
                "JWT_SECRET",
                format!(
                    "must be at least 32 bytes long (got {}); generate one with `openssl rand -hex 32`",
                    secret.expose().len()
                ),
            );
        }
        AuthConfig {
            access_token_ttl: p.positive_duration(
                "ACCESS_TOKEN_TTL",
                &raw.access_token_ttl,
                15 * 60 * SECOND,
            ),
            issuer: p.non_empty("JWT_ISSUER", &raw.jwt_issuer, "cascade"),
            audience: p.non_empty("JWT_AUDIENCE", &raw.jwt_audience, "cascade-api"),
            login_limit: rate_limit(p, "RATE_LIMIT_LOGIN", &raw.rate_limit_login, "5/1m"),
            auth_limit: rate_limit(p, "RATE_LIMIT_AUTH", &raw.rate_limit_auth, "20/1m"),
            api_limit: rate_limit(p, "RATE_LIMIT_API", &raw.rate_limit_api, "100/1s"),
            session_default_ttl: p.positive_duration(
                "SESSION_DEFAULT_TTL",
                &raw.session_default_ttl,
                1800 * SECOND,
            ),
            session_cleanup_interval: p.positive_duration(
                "SESSION_CLEANUP_INTERVAL",
                &raw.session_cleanup_interval,
                300 * SECOND,
            ),
            jwt_secret,
        }
    }
}

/// `N/period` (`5/1m`, `100/1s`), or `off`.
fn rate_limit(
    p: &mut Parser,
    var: &'static str,
    raw: &Option<String>,
    default: &str,
) -> Option<RateLimit> {
    let text = raw.as_deref().unwrap_or(default).trim();
    if ["off", "0", "none"].contains(&text.to_ascii_lowercase().as_str()) {
        return None;
    }
    let parsed = text.split_once('/').and_then(|(count, period)| {
        let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
        let period = parse_duration(period.trim(), SECOND)
            .ok()
            .filter(|p| !p.is_zero())?;
        Some(RateLimit { count, period })
    });
    if parsed.is_none() {
        p.fail(
            var,
            format!("expected N/period such as 5/1m or 100/1s, or off; got {text:?}"),
        );
    }
    parsed
}
