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
    /// Login attempts per username from one client address (IPv6: per /64), as N/period; a
    /// username also gets N failures from anywhere before new addresses back off
    /// exponentially (doubling from period/N) [default: 5/1m].
    #[arg(long, env = "RATE_LIMIT_LOGIN", global = true)]
    pub rate_limit_login: Option<String>,
    /// Longest wait of the per-username login backoff [default: 15m].
    #[arg(long, env = "LOGIN_BACKOFF_MAX", global = true)]
    pub login_backoff_max: Option<String>,
    /// Registrations, token refreshes and revocations per client address (IPv6: per /64), as
    /// N/period; login attempts per address have a budget of the same size [default: 20/1m].
    #[arg(long, env = "RATE_LIMIT_AUTH", global = true)]
    pub rate_limit_auth: Option<String>,
    /// How long a spent refresh token presented again returns its successor instead of
    /// revoking the session (a retry after a lost response); 0 disables [default: 10s].
    #[arg(long, env = "REFRESH_GRACE", global = true)]
    pub refresh_grace: Option<String>,
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
    /// Per (username, client network) pair; with [`login_backoff_max`](Self::login_backoff_max)
    /// also the per-username backoff ([`AuthConfig::login_backoff`]).
    pub login_limit: Option<RateLimit>,
    pub login_backoff_max: Duration,
    /// Registration, refresh and revocation per client network; logins per client network.
    pub auth_limit: Option<RateLimit>,
    /// A spent refresh token presented again within this of its rotation gets its successor
    /// back; zero: any reuse revokes the session.
    pub refresh_grace: Duration,
    /// Authenticated calls, per user.
    pub api_limit: Option<RateLimit>,
}

/// `count` requests per `period`, with a burst of `count`. Parsed from `N/period` (`5/1m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

/// The per-username login ceiling: `free` failures (since the last success, forgotten after
/// `forget` without one), then each further attempt from an address the username has not
/// logged in from waits `base`, doubling per failure, at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginBackoff {
    pub free: u32,
    pub base: Duration,
    pub cap: Duration,
    pub forget: Duration,
}

impl AuthConfig {
    /// Derived from `RATE_LIMIT_LOGIN` (`N/period`: `N` free failures, then `period / N`
    /// doubling) and `LOGIN_BACKOFF_MAX`; none when login limits are off.
    pub fn login_backoff(&self) -> Option<LoginBackoff> {
        let limit = self.login_limit?;
        let base = (limit.period / limit.count).max(Duration::from_millis(1));
        let cap = self.login_backoff_max.max(base);
        Some(LoginBackoff {
            free: limit.count,
            base,
            cap,
            forget: cap + limit.period,
        })
    }
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
            login_backoff_max: p.positive_duration(
                "LOGIN_BACKOFF_MAX",
                &raw.login_backoff_max,
                15 * 60 * SECOND,
            ),
            refresh_grace: refresh_grace(p, &raw.refresh_grace),
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

/// The grace window stays short: during it, a stolen spent token still yields its successor.
const REFRESH_GRACE_MAX: Duration = Duration::from_secs(300);

fn refresh_grace(p: &mut Parser, raw: &Option<String>) -> Duration {
    let default = 10 * SECOND;
    let grace = p.duration("REFRESH_GRACE", raw, default);
    if grace > REFRESH_GRACE_MAX {
        p.fail("REFRESH_GRACE", "must be at most 5m (300s)");
        return default;
    }
    grace
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: RawIdentity) -> Result<AuthConfig, Vec<&'static str>> {
        let mut p = Parser::new();
        let config = AuthConfig::parse(&mut p, &raw);
        p.finish(config)
            .map_err(|e| e.0.iter().map(|issue| issue.var).collect())
    }

    #[test]
    fn the_login_backoff_follows_rate_limit_login_and_the_refresh_grace_is_bounded() {
        let c = parse(RawIdentity::default()).unwrap();
        assert_eq!(c.refresh_grace, Duration::from_secs(10));
        let backoff = c.login_backoff().expect("on by default");
        assert_eq!(backoff.free, 5);
        assert_eq!(backoff.base, Duration::from_secs(12));
        assert_eq!(backoff.cap, Duration::from_secs(900));
        assert_eq!(backoff.forget, Duration::from_secs(960));

        let c = parse(RawIdentity {
            rate_limit_login: Some("off".into()),
            refresh_grace: Some("0".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.login_backoff(), None);
        assert_eq!(c.refresh_grace, Duration::ZERO);

        let bad = parse(RawIdentity {
            refresh_grace: Some("1h".into()),
            login_backoff_max: Some("0s".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(bad, vec!["LOGIN_BACKOFF_MAX", "REFRESH_GRACE"]);
    }
}
