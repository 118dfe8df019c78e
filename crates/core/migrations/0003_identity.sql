-- Identity: accounts, login sessions, their refresh tokens and revoked access tokens.
-- `cascade_users` is seed 001's table; `venice_username` is nullable here because an account
-- exists before it is linked to a Venice citizen (linking is verified against the ledger).
CREATE TABLE cascade_users (
    id                  BIGSERIAL PRIMARY KEY,
    username            TEXT NOT NULL,
    password_hash       TEXT NOT NULL,
    email               TEXT,
    venice_username     VARCHAR(255) UNIQUE,
    stripe_customer_id  VARCHAR(255),
    subscription_tier   VARCHAR(50) NOT NULL DEFAULT 'observer',
    subscription_status VARCHAR(50),
    last_login          TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    metadata            JSONB NOT NULL DEFAULT '{}'
);
-- Usernames are unique case-insensitively: "Alice" and "alice" are one account.
CREATE UNIQUE INDEX cascade_users_username_ci ON cascade_users (lower(username));
CREATE INDEX idx_stripe_customer ON cascade_users (stripe_customer_id);

-- One row per login. PostgreSQL is the truth; the cache engine holds a copy per session.
CREATE TABLE auth_sessions (
    id            UUID PRIMARY KEY,
    user_id       BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL,
    revoked_at    TIMESTAMPTZ,
    revoked_reason TEXT,
    user_agent    TEXT,
    client_addr   TEXT
);
CREATE INDEX auth_sessions_user ON auth_sessions (user_id, created_at DESC);
CREATE INDEX auth_sessions_expires ON auth_sessions (expires_at);

-- Refresh tokens are stored as SHA-256 digests. A used (rotated) token stays here so that its
-- reuse is recognised and revokes the whole session.
CREATE TABLE auth_refresh_tokens (
    token_hash  BYTEA PRIMARY KEY,
    session_id  UUID NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotated_at  TIMESTAMPTZ
);
CREATE INDEX auth_refresh_tokens_session ON auth_refresh_tokens (session_id);

-- Access tokens revoked before their `exp` (by `jti`), kept until they would have expired.
CREATE TABLE auth_revoked_tokens (
    jti         UUID PRIMARY KEY,
    session_id  UUID NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX auth_revoked_tokens_session ON auth_revoked_tokens (session_id);
