//! Identity: accounts, login sessions, access and refresh tokens, and rate limiting.
//!
//! - Accounts live in `cascade_users`; passwords are argon2id ([`password`]).
//! - A login creates a row in `auth_sessions` (the truth) and returns a short-lived JWT access
//!   token (`sid` = the session, `jti` = the token) and an opaque refresh token bound to the
//!   session ([`token`]).
//! - Every authenticated request reads its session through the cache engine (namespace
//!   `sessions`, tagged `user:<id>`), so a hot session costs no database round trip, and a
//!   revocation (logout, a revoked `jti`, refresh-token reuse) is an invalidation that every
//!   instance has acknowledged before the call returns. Redis losing everything logs nobody
//!   out: the next read reloads from PostgreSQL.
//! - Sliding expiry: a session used within its lifetime is extended, writing PostgreSQL at most
//!   once per [`SLIDE_STEP`] (or a tenth of `SESSION_DEFAULT_TTL` if shorter) per session.

mod local_table;
pub mod login_limit;
pub mod password;
pub mod ratelimit;
pub mod token;
pub mod username;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::shutdown::ShutdownSignal;
use crate::tasks::Detached;

pub use password::Passwords;
pub use ratelimit::{Decision, RateLimiter};
pub use token::{Claims, TokenError, TokenKeys};
pub use username::Username;

/// The cache namespace of sessions.
pub const SESSIONS: &str = "sessions";
/// A session is written back (expiry pushed forward) at most this often (or every tenth of
/// its lifetime, if that is shorter).
pub const SLIDE_STEP: Duration = Duration::from_secs(60);

pub const USERNAME_MAX: usize = 32;
pub const PASSWORD_MIN: usize = 8;
/// Long enough for any passphrase, short enough that hashing it is no denial of service.
pub const PASSWORD_MAX: usize = 256;
pub const EMAIL_MAX: usize = 254;
pub const USER_AGENT_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Bad input: a 400 naming the field.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("username is already taken")]
    UsernameTaken,
    /// The one message for an unknown user and a wrong password.
    #[error("invalid username or password")]
    BadCredentials,
    /// A missing, malformed, expired or revoked token or session.
    #[error("{0}")]
    Unauthorized(String),
    #[error("refresh token reuse detected: the session has been revoked")]
    RefreshReuse,
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Internal(String),
}

impl From<tokio_postgres::Error> for AuthError {
    fn from(err: tokio_postgres::Error) -> Self {
        AuthError::Db(DbError::from(err))
    }
}

impl From<CacheError<AuthError>> for AuthError {
    fn from(err: CacheError<AuthError>) -> Self {
        match err {
            CacheError::Load(err) => err,
            CacheError::Codec(err) => {
                AuthError::Internal(format!("cached session could not be decoded: {err}"))
            }
        }
    }
}

/// An account, as shown to its owner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub email: Option<String>,
    pub tier: String,
    pub created_at: String,
    pub last_login: Option<String>,
    /// The Venice citizen this account is linked to (the application's `POST /me/citizen`).
    #[serde(default)]
    pub venice_username: Option<String>,
}

/// What a login, registration or refresh hands back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    pub refresh_token: String,
    pub session_id: Uuid,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: i64,
    pub username: String,
    /// The account's `subscription_tier` as of the session's cached copy (a tier change
    /// invalidates it): a name the application gives meaning to (the core ranks no tiers; the
    /// application's tier table says what each may do).
    pub tier: String,
    pub session_id: Uuid,
    pub jti: Uuid,
    /// Expiry of the access token, in seconds since the epoch.
    pub token_exp: u64,
}

/// A session, as listed to its owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: Uuid,
    pub created_at: String,
    pub last_seen_at: String,
    pub expires_at: String,
    pub user_agent: Option<String>,
    pub client_addr: Option<String>,
    /// The session of the token this listing was asked with.
    pub current: bool,
}

/// The cached copy of one session: everything a request needs to be authorised.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    user_id: i64,
    username: String,
    tier: String,
    expires_at_ms: i64,
    last_seen_at_ms: i64,
    revoked: bool,
    /// Access tokens of this session revoked before their expiry.
    revoked_jtis: Vec<Uuid>,
}

/// Where a login comes from, recorded on its session.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub user_agent: Option<String>,
    pub addr: Option<String>,
}

/// The identity service: one per process, cheap to clone.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    cache: Cache,
    /// Where revocations and rotations run, so a client that hangs up cannot cut them short
    /// and the application waits for them when it stops.
    detached: Detached,
    keys: TokenKeys,
    /// Derives a refresh token's successor ([`token::successor_refresh_token`]).
    refresh_key: Vec<u8>,
    /// A spent refresh token presented again within this returns its successor.
    refresh_grace: Duration,
    passwords: Passwords,
    session_ttl: Duration,
    slide_step: Duration,
    access_ttl: Duration,
    /// Where revocations are announced (`auth.session_revoked`, `auth.token_revoked`), so
    /// every instance closes the WebSocket connections of what was revoked
    /// ([`Identity::announce_revocations`]).
    events: std::sync::OnceLock<crate::events::Events>,
}

/// `timestamptz` as RFC 3339 text in UTC, in SQL.
macro_rules! iso {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

const USER_COLUMNS: &str = concat!(
    "id, username, email, subscription_tier, ",
    iso!("created_at"),
    ", ",
    iso!("last_login"),
    ", venice_username"
);

fn user_from_row(row: &tokio_postgres::Row) -> User {
    User {
        id: row.get(0),
        username: row.get(1),
        email: row.get(2),
        tier: row.get(3),
        created_at: row.get(4),
        last_login: row.get(5),
        venice_username: row.get(6),
    }
}

impl Identity {
    pub fn new(config: &Config, db: Db, cache: Cache, detached: Detached) -> Identity {
        let secret = config
            .auth
            .jwt_secret
            .as_ref()
            .map(|s| s.expose().as_bytes().to_vec())
            .unwrap_or_else(TokenKeys::random_secret);
        // The dummy hash that unknown usernames are verified against is computed now, so the
        // first unknown-user login does not take one argon2 run longer than a wrong password.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(password::prepare);
        }
        Identity {
            inner: Arc::new(Inner {
                detached,
                db,
                cache,
                keys: TokenKeys::new(&secret, &config.auth.issuer, &config.auth.audience),
                // A key of its own, derived from the signing secret (HMAC of a label), so
                // successors agree across instances that share `JWT_SECRET`.
                refresh_key: token::successor_refresh_token(&secret, "refresh key")
                    .0
                    .into_bytes(),
                refresh_grace: config.auth.refresh_grace,
                passwords: Passwords::default(),
                session_ttl: config.auth.session_default_ttl,
                slide_step: SLIDE_STEP.min(config.auth.session_default_ttl / 10),
                access_ttl: config.auth.access_token_ttl,
                events: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Announces every revocation from now on on `events` (the first call wins).
    pub fn announce_revocations(&self, events: crate::events::Events) {
        let _ = self.inner.events.set(events);
    }

    /// Tells every instance that `session` ended (its connections close), or only the access
    /// token `jti` of it. Best effort: the bus is at most once, and the token's expiry still
    /// bounds a connection that misses it.
    async fn announce(&self, session: Uuid, user_id: Option<i64>, jti: Option<Uuid>) {
        let Some(events) = self.inner.events.get() else {
            return;
        };
        let (kind, data) = match jti {
            Some(jti) => (
                crate::events::TOKEN_REVOKED,
                serde_json::json!({ "session_id": session.to_string(), "jti": jti.to_string() }),
            ),
            None => (
                crate::events::SESSION_REVOKED,
                serde_json::json!({ "session_id": session.to_string(), "user_id": user_id }),
            ),
        };
        let _ = events
            .publish(crate::events::AUTH_CHANNEL, kind, data)
            .await;
    }

    pub fn keys(&self) -> &TokenKeys {
        &self.inner.keys
    }

    /// Creates an account and logs it in.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        email: Option<&str>,
        client: &ClientInfo,
    ) -> Result<(User, Tokens), AuthError> {
        let username = Username::parse(username)?;
        validate_password(password)?;
        // A given email must be one: a blank is refused like any other non-address (leave the
        // field out, or send null, for none), as the API description says.
        let email = email.map(|e| validate_email(e.trim())).transpose()?;
        let hash = self.inner.passwords.hash(password).await;
        let conn = self.inner.db.conn().await?;
        let sql = format!(
            "INSERT INTO cascade_users (username, password_hash, email) VALUES ($1, $2, $3) \
             ON CONFLICT (lower(username)) DO NOTHING RETURNING {USER_COLUMNS}"
        );
        let stmt = conn.prepare_cached(&sql).await?;
        let row = conn
            .query_opt(&stmt, &[&username.as_str(), &hash, &email])
            .await?
            .ok_or(AuthError::UsernameTaken)?;
        drop(conn);
        let user = user_from_row(&row);
        let tokens = self.open_session(user.id, &user.tier, client).await?;
        Ok((user, tokens))
    }

    /// Checks a username and password and opens a session. Unknown users and wrong passwords
    /// get the same error after the same work.
    ///
    /// The username is a parsed [`Username`] (a malformed one is refused as bad input before
    /// anything is looked up or hashed, which reveals nothing about which accounts exist) and
    /// is looked up by its [`key`](Username::key), the same string the login limiter counts.
    pub async fn login(
        &self,
        username: &Username,
        password: &str,
        client: &ClientInfo,
    ) -> Result<(User, Tokens), AuthError> {
        check_login_password(password)?;
        let conn = self.inner.db.conn().await?;
        let stmt = conn
            .prepare_cached(
                "SELECT id, password_hash FROM cascade_users WHERE lower(username) = lower($1)",
            )
            .await?;
        let found = conn.query_opt(&stmt, &[&username.key()]).await?;
        drop(conn);
        let (id, hash) = match found {
            Some(row) => (Some(row.get::<_, i64>(0)), Some(row.get::<_, String>(1))),
            None => (None, None),
        };
        if !self.inner.passwords.verify(password, hash).await {
            return Err(AuthError::BadCredentials);
        }
        let id = id.ok_or(AuthError::BadCredentials)?;
        let conn = self.inner.db.conn().await?;
        let sql = format!(
            "UPDATE cascade_users SET last_login = now() WHERE id = $1 RETURNING {USER_COLUMNS}"
        );
        let stmt = conn.prepare_cached(&sql).await?;
        let row = conn
            .query_opt(&stmt, &[&id])
            .await?
            .ok_or(AuthError::BadCredentials)?;
        drop(conn);
        let user = user_from_row(&row);
        let tokens = self.open_session(user.id, &user.tier, client).await?;
        Ok((user, tokens))
    }

    async fn open_session(
        &self,
        user_id: i64,
        tier: &str,
        client: &ClientInfo,
    ) -> Result<Tokens, AuthError> {
        let session = Uuid::new_v4();
        let (refresh, digest) = token::new_refresh_token();
        let user_agent = client
            .user_agent
            .as_deref()
            .map(|ua| truncate(ua, USER_AGENT_MAX));
        let mut conn = self.inner.db.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "INSERT INTO auth_sessions (id, user_id, expires_at, user_agent, client_addr) \
             VALUES ($1, $2, now() + make_interval(secs => $3), $4, $5)",
            &[
                &session,
                &user_id,
                &self.inner.session_ttl.as_secs_f64(),
                &user_agent,
                &client.addr,
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO auth_refresh_tokens (token_hash, session_id) VALUES ($1, $2)",
            &[&digest, &session],
        )
        .await?;
        tx.commit().await?;
        Ok(self.tokens(user_id, session, tier, refresh))
    }

    fn tokens(&self, user_id: i64, session: Uuid, tier: &str, refresh_token: String) -> Tokens {
        let (access_token, _) =
            self.inner
                .keys
                .issue(user_id, session, tier, self.inner.access_ttl);
        Tokens {
            access_token,
            token_type: "Bearer",
            expires_in: self.inner.access_ttl.as_secs().max(1),
            refresh_token,
            session_id: session,
        }
    }

    /// Exchanges a refresh token for a new pair. The presented token is spent; presenting it
    /// again revokes the whole session (it was stolen, or the client is confused: either way
    /// the session is no longer trustworthy), except within `REFRESH_GRACE` of its rotation
    /// while its successor is still unused: that is a client retrying after the answer was
    /// lost, and it gets the same successor again (with a fresh access token) instead.
    ///
    /// Runs to completion even if the caller is dropped ([`to_completion`]): a rotation or a
    /// revocation for reuse that committed always drops the cached session everywhere.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, AuthError> {
        let this = self.clone();
        let refresh_token = refresh_token.to_string();
        self.inner
            .to_completion(async move { this.rotate(&refresh_token).await })
            .await
    }

    async fn rotate(&self, refresh_token: &str) -> Result<Tokens, AuthError> {
        let invalid = || AuthError::Unauthorized("invalid refresh token".into());
        if refresh_token.len() != 64 || !refresh_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let digest = token::refresh_digest(refresh_token);
        let mut conn = self.inner.db.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT t.session_id, t.rotated_at IS NOT NULL, s.revoked_at IS NOT NULL, \
                        s.expires_at <= now(), s.user_id, u.subscription_tier, \
                        coalesce(t.rotated_at > now() - make_interval(secs => $2), false) \
                 FROM auth_refresh_tokens t \
                 JOIN auth_sessions s ON s.id = t.session_id \
                 JOIN cascade_users u ON u.id = s.user_id \
                 WHERE t.token_hash = $1 FOR UPDATE OF t, s",
                &[&digest, &self.inner.refresh_grace.as_secs_f64()],
            )
            .await?
            .ok_or_else(invalid)?;
        let (session, spent, revoked, expired, user_id, tier): (
            Uuid,
            bool,
            bool,
            bool,
            i64,
            String,
        ) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        let in_grace: bool = row.get(6);
        if revoked || expired {
            return Err(AuthError::Unauthorized("the session has ended".into()));
        }
        let (fresh, fresh_digest) =
            token::successor_refresh_token(&self.inner.refresh_key, refresh_token);
        if spent && in_grace {
            // The session row is locked, so the successor cannot be rotated meanwhile.
            let unused = tx
                .query_opt(
                    "SELECT 1 FROM auth_refresh_tokens \
                     WHERE token_hash = $1 AND session_id = $2 AND rotated_at IS NULL",
                    &[&fresh_digest, &session],
                )
                .await?
                .is_some();
            if unused {
                tx.commit().await?;
                drop(conn);
                tracing::info!(%session, "spent refresh token retried within the grace window");
                return Ok(self.tokens(user_id, session, &tier, fresh));
            }
        }
        if spent {
            tx.execute(
                "UPDATE auth_sessions SET revoked_at = now(), revoked_reason = 'refresh token reuse' \
                 WHERE id = $1 AND revoked_at IS NULL",
                &[&session],
            )
            .await?;
            tx.commit().await?;
            drop(conn);
            self.forget_session(session).await;
            self.announce(session, Some(user_id), None).await;
            tracing::warn!(%session, user_id, "refresh token reused: session revoked");
            return Err(AuthError::RefreshReuse);
        }
        tx.execute(
            "UPDATE auth_refresh_tokens SET rotated_at = now() WHERE token_hash = $1",
            &[&digest],
        )
        .await?;
        tx.execute(
            "INSERT INTO auth_refresh_tokens (token_hash, session_id) VALUES ($1, $2)",
            &[&fresh_digest, &session],
        )
        .await?;
        tx.execute(
            "UPDATE auth_sessions SET last_seen_at = now(), \
                    expires_at = now() + make_interval(secs => $2) WHERE id = $1",
            &[&session, &self.inner.session_ttl.as_secs_f64()],
        )
        .await?;
        tx.commit().await?;
        drop(conn);
        self.forget_session(session).await;
        Ok(self.tokens(user_id, session, &tier, fresh))
    }

    /// Verifies an access token and its session. Refuses bad or expired tokens, sessions that
    /// ended or were revoked, and revoked `jti`s.
    pub async fn authenticate(&self, access_token: &str) -> Result<Principal, AuthError> {
        let claims = self
            .inner
            .keys
            .verify(access_token)
            .map_err(|err| match err {
                TokenError::Expired => {
                    AuthError::Unauthorized("the access token has expired".into())
                }
                TokenError::Invalid(why) => {
                    AuthError::Unauthorized(format!("invalid access token: {why}"))
                }
            })?;
        let user_id: i64 = claims
            .sub
            .parse()
            .map_err(|_| AuthError::Unauthorized("invalid access token: bad subject".into()))?;
        let record = self
            .session(claims.sid, user_id)
            .await?
            .filter(|r| r.user_id == user_id)
            .ok_or_else(|| AuthError::Unauthorized("the session does not exist".into()))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if record.revoked {
            return Err(AuthError::Unauthorized(
                "the session has been revoked".into(),
            ));
        }
        if record.expires_at_ms <= now_ms {
            return Err(AuthError::Unauthorized("the session has expired".into()));
        }
        if record.revoked_jtis.contains(&claims.jti) {
            return Err(AuthError::Unauthorized(
                "the access token has been revoked".into(),
            ));
        }
        if now_ms - record.last_seen_at_ms >= self.inner.slide_step.as_millis() as i64 {
            self.slide(claims.sid).await;
        }
        Ok(Principal {
            user_id,
            username: record.username,
            tier: record.tier,
            session_id: claims.sid,
            jti: claims.jti,
            token_exp: claims.exp,
        })
    }

    async fn session(&self, id: Uuid, user_id: i64) -> Result<Option<SessionRecord>, AuthError> {
        let db = self.inner.db.clone();
        let tags = [format!("user:{user_id}")];
        let record = self
            .inner
            .cache
            .get_or_load(SESSIONS, &id.to_string(), &tags, || async move {
                let conn = db.conn().await?;
                let stmt = conn
                    .prepare_cached(
                        "SELECT s.user_id, u.username, u.subscription_tier, \
                                (extract(epoch FROM s.expires_at) * 1000)::int8, \
                                (extract(epoch FROM s.last_seen_at) * 1000)::int8, \
                                s.revoked_at IS NOT NULL, \
                                ARRAY(SELECT jti FROM auth_revoked_tokens r \
                                      WHERE r.session_id = s.id AND r.expires_at > now()) \
                         FROM auth_sessions s JOIN cascade_users u ON u.id = s.user_id \
                         WHERE s.id = $1",
                    )
                    .await?;
                let row = conn.query_opt(&stmt, &[&id]).await?;
                Ok::<_, AuthError>(row.map(|row| SessionRecord {
                    user_id: row.get(0),
                    username: row.get(1),
                    tier: row.get(2),
                    expires_at_ms: row.get(3),
                    last_seen_at_ms: row.get(4),
                    revoked: row.get(5),
                    revoked_jtis: row.get(6),
                }))
            })
            .await?;
        Ok(record)
    }

    /// Pushes the session's expiry forward. A failure is logged, not fatal: the session stays
    /// valid until its current expiry.
    async fn slide(&self, session: Uuid) {
        let result = async {
            let conn = self.inner.db.conn().await?;
            conn.execute(
                "UPDATE auth_sessions SET last_seen_at = now(), \
                        expires_at = now() + make_interval(secs => $2) \
                 WHERE id = $1 AND revoked_at IS NULL",
                &[&session, &self.inner.session_ttl.as_secs_f64()],
            )
            .await?;
            Ok::<_, AuthError>(())
        }
        .await;
        match result {
            Ok(()) => self.forget_session(session).await,
            Err(err) => tracing::warn!(%session, error = %err, "session expiry not extended"),
        }
    }

    /// Drops the cached copy of a session on every instance.
    async fn forget_session(&self, session: Uuid) {
        self.inner
            .cache
            .invalidate(SESSIONS, &session.to_string())
            .await;
    }

    /// Ends a session (logout, or its owner revoking it from another device). Returns false
    /// when `user_id` has no such session: another user's session is indistinguishable from a
    /// missing one.
    ///
    /// Like every revocation, it runs to completion even if the caller is dropped (the client
    /// hung up right after sending its logout): otherwise a cancellation between the commit
    /// and the invalidation would leave other instances accepting the session's tokens from
    /// their cached copy until its next sliding update.
    pub async fn revoke_session(
        &self,
        user_id: i64,
        session: Uuid,
        reason: &str,
    ) -> Result<bool, AuthError> {
        let this = self.clone();
        let reason = reason.to_string();
        self.inner
            .to_completion(async move { this.end_session(user_id, session, &reason).await })
            .await
    }

    async fn end_session(
        &self,
        user_id: i64,
        session: Uuid,
        reason: &str,
    ) -> Result<bool, AuthError> {
        let conn = self.inner.db.conn().await?;
        let found = conn
            .query_opt(
                "UPDATE auth_sessions SET revoked_at = coalesce(revoked_at, now()), \
                        revoked_reason = coalesce(revoked_reason, $3) \
                 WHERE id = $1 AND user_id = $2 AND expires_at > now() RETURNING revoked_at",
                &[&session, &user_id, &reason],
            )
            .await?
            .is_some();
        drop(conn);
        if found {
            self.forget_session(session).await;
            self.announce(session, Some(user_id), None).await;
        }
        Ok(found)
    }

    /// Revokes one access token before its expiry; its session lives on.
    pub async fn revoke_token(&self, claims: &Claims) -> Result<(), AuthError> {
        let this = self.clone();
        let claims = claims.clone();
        self.inner
            .to_completion(async move { this.revoke_jti(&claims).await })
            .await
    }

    async fn revoke_jti(&self, claims: &Claims) -> Result<(), AuthError> {
        let conn = self.inner.db.conn().await?;
        conn.execute(
            "INSERT INTO auth_revoked_tokens (jti, session_id, expires_at) \
             SELECT $1, id, to_timestamp($3::float8) FROM auth_sessions WHERE id = $2 \
             ON CONFLICT (jti) DO NOTHING",
            &[&claims.jti, &claims.sid, &(claims.exp as f64)],
        )
        .await?;
        drop(conn);
        self.forget_session(claims.sid).await;
        self.announce(claims.sid, None, Some(claims.jti)).await;
        Ok(())
    }

    /// Revokes whatever `token` is (RFC 7009): an access token loses its `jti`, a refresh
    /// token ends its session. Unknown tokens are ignored.
    pub async fn revoke_any(&self, token: &str) -> Result<(), AuthError> {
        if let Ok(claims) = self.inner.keys.verify(token) {
            return self.revoke_token(&claims).await;
        }
        let this = self.clone();
        let token = token.to_string();
        self.inner
            .to_completion(async move { this.revoke_refresh(&token).await })
            .await
    }

    async fn revoke_refresh(&self, token: &str) -> Result<(), AuthError> {
        let digest = token::refresh_digest(token);
        let conn = self.inner.db.conn().await?;
        let row = conn
            .query_opt(
                "UPDATE auth_sessions SET revoked_at = now(), revoked_reason = 'refresh token revoked' \
                 WHERE id = (SELECT session_id FROM auth_refresh_tokens WHERE token_hash = $1) \
                   AND revoked_at IS NULL RETURNING id, user_id",
                &[&digest],
            )
            .await?;
        drop(conn);
        if let Some(row) = row {
            self.forget_session(row.get(0)).await;
            self.announce(row.get(0), Some(row.get(1)), None).await;
        }
        Ok(())
    }

    /// The account of `user_id`.
    pub async fn user(&self, user_id: i64) -> Result<User, AuthError> {
        let conn = self.inner.db.conn().await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM cascade_users WHERE id = $1");
        let stmt = conn.prepare_cached(&sql).await?;
        let row = conn
            .query_opt(&stmt, &[&user_id])
            .await?
            .ok_or(AuthError::NotFound)?;
        Ok(user_from_row(&row))
    }

    /// The id of the account named `username` (case-insensitively, as logins match it).
    pub async fn find_user_id(&self, username: &str) -> Result<Option<i64>, AuthError> {
        let Ok(username) = Username::parse(username) else {
            return Ok(None);
        };
        let conn = self.inner.db.conn().await?;
        let row = conn
            .query_opt(
                "SELECT id FROM cascade_users WHERE lower(username) = lower($1)",
                &[&username.key()],
            )
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Changes a user's tier; every cached session of theirs is dropped so the new tier
    /// applies on the next request, on every instance.
    pub async fn set_tier(&self, user_id: i64, tier: &str) -> Result<(), AuthError> {
        let (this, tier) = (self.clone(), tier.to_string());
        self.inner
            .to_completion(async move { this.change_tier(user_id, &tier).await })
            .await
    }

    async fn change_tier(&self, user_id: i64, tier: &str) -> Result<(), AuthError> {
        let conn = self.inner.db.conn().await?;
        let n = conn
            .execute(
                "UPDATE cascade_users SET subscription_tier = $2 WHERE id = $1",
                &[&user_id, &tier],
            )
            .await?;
        drop(conn);
        if n == 0 {
            return Err(AuthError::NotFound);
        }
        self.inner
            .cache
            .invalidate_tag(&format!("user:{user_id}"))
            .await;
        Ok(())
    }

    /// The live sessions of `user_id`, newest first.
    pub async fn sessions(
        &self,
        user_id: i64,
        current: Uuid,
    ) -> Result<Vec<SessionInfo>, AuthError> {
        let conn = self.inner.db.conn().await?;
        let sql = concat!(
            "SELECT id, ",
            iso!("created_at"),
            ", ",
            iso!("last_seen_at"),
            ", ",
            iso!("expires_at"),
            ", user_agent, client_addr FROM auth_sessions \
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now() \
             ORDER BY created_at DESC, id LIMIT 100"
        );
        let stmt = conn.prepare_cached(sql).await?;
        let rows = conn.query(&stmt, &[&user_id]).await?;
        Ok(rows
            .iter()
            .map(|row| {
                let id: Uuid = row.get(0);
                SessionInfo {
                    id,
                    created_at: row.get(1),
                    last_seen_at: row.get(2),
                    expires_at: row.get(3),
                    user_agent: row.get(4),
                    client_addr: row.get(5),
                    current: id == current,
                }
            })
            .collect())
    }

    /// Deletes sessions that expired or were revoked more than a day ago, and revoked tokens
    /// past their expiry. Returns how many sessions went.
    pub async fn cleanup(&self) -> Result<u64, AuthError> {
        let conn = self.inner.db.conn().await?;
        let sessions = conn
            .execute(
                "DELETE FROM auth_sessions WHERE expires_at < now() \
                    OR revoked_at < now() - interval '1 day'",
                &[],
            )
            .await?;
        conn.execute(
            "DELETE FROM auth_revoked_tokens WHERE expires_at < now()",
            &[],
        )
        .await?;
        // Unified mode's rate limits (`ratelimit.rs`); empty in the other modes.
        conn.execute("DELETE FROM rate_limits WHERE expires_at < now()", &[])
            .await?;
        Ok(sessions)
    }

    /// Runs [`cleanup`](Self::cleanup) every `interval` until `stop`.
    pub async fn run_cleanup(self, interval: Duration, mut stop: ShutdownSignal) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.recv() => return,
            }
            match self.cleanup().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "expired sessions removed"),
                Err(err) => tracing::warn!(error = %err, "session cleanup failed; will retry"),
            }
        }
    }
}

/// Runs `work` on its own task and waits for it. Dropping the caller (a request future whose
/// client went away) no longer stops `work` halfway: a committed change always gets its
/// invalidation and broadcast. A panic in `work` is re-raised in the caller.
impl Inner {
    /// Runs `work` in the application's detached tasks: it finishes even if the caller is
    /// dropped (a client that hung up), and shutdown waits for it.
    async fn to_completion<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, AuthError>> + Send + 'static,
    ) -> Result<T, AuthError> {
        match self.detached.run(work).await {
            Ok(result) => result,
            Err(stopping) => Err(AuthError::Internal(stopping.to_string())),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// 3 to 32 characters: letters, digits, `_`, `-`, `.`; starting with a letter or digit
/// ([`Username::parse`]).
pub fn validate_username(username: &str) -> Result<(), AuthError> {
    Username::parse(username).map(drop)
}

/// A new password: at least [`PASSWORD_MIN`] characters, and what every password must be
/// ([`check_login_password`]).
pub fn validate_password(password: &str) -> Result<(), AuthError> {
    let chars = password.chars().count();
    if chars < PASSWORD_MIN {
        return Err(AuthError::Invalid {
            field: "password",
            message: format!("password must be at least {PASSWORD_MIN} characters long"),
        });
    }
    check_login_password(password)
}

/// What any presented password must be: at most [`PASSWORD_MAX`] bytes (hashing stays cheap)
/// and without NUL (which many clients and C libraries truncate at, so such a password could
/// not be typed the same way twice). Account-independent, so refusing reveals nothing.
pub fn check_login_password(password: &str) -> Result<(), AuthError> {
    if password.len() > PASSWORD_MAX {
        return Err(AuthError::Invalid {
            field: "password",
            message: format!("password must be at most {PASSWORD_MAX} bytes long"),
        });
    }
    if password.contains('\0') {
        return Err(AuthError::Invalid {
            field: "password",
            message: "password must not contain NUL characters".into(),
        });
    }
    Ok(())
}

/// A plausible address (`local@domain.tld`, no spaces, at most 254 bytes), lower-cased domain.
pub fn validate_email(email: &str) -> Result<String, AuthError> {
    let invalid = || AuthError::Invalid {
        field: "email",
        message: "email must look like name@example.com (at most 254 characters)".into(),
    };
    if email.len() > EMAIL_MAX || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
    if local.is_empty() || !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.')
    {
        return Err(invalid());
    }
    Ok(format!("{local}@{}", domain.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_passwords_and_emails_are_validated() {
        assert!(validate_username("alice_01").is_ok());
        for bad in ["al", "-alice", "alice smith", "ali\u{e7}e", &"a".repeat(33)] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("1234567").is_err());
        assert!(validate_password(&"x".repeat(PASSWORD_MAX + 1)).is_err());
        for bad in ["pass\0word", "\0\0\0\0\0\0\0\0"] {
            assert!(matches!(
                validate_password(bad),
                Err(AuthError::Invalid {
                    field: "password",
                    ..
                })
            ));
            assert!(check_login_password(bad).is_err());
        }
        assert!(check_login_password("short").is_ok(), "no minimum at login");
        assert_eq!(
            validate_email("Bob@Example.COM").unwrap(),
            "Bob@example.com"
        );
        for bad in [
            "",
            "bob",
            "bob@",
            "@x.io",
            "bob@localhost",
            "b ob@x.io",
            "bob@x.",
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
    }
}
