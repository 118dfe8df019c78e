-- Rate limits of unified mode (CACHE_BACKEND=postgres without Redis): GCRA's theoretical
-- arrival time per key, in microseconds since the epoch by PostgreSQL's clock, so every
-- instance shares one budget per key as they do on Redis. UNLOGGED like the cache tables: a
-- crash forgets the limits, never anything else. Expired rows are removed with sessions
-- (SESSION_CLEANUP_INTERVAL).
CREATE UNLOGGED TABLE rate_limits (
    key        TEXT PRIMARY KEY,
    tat_us     BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX rate_limits_expires_at ON rate_limits (expires_at);
