-- The shared cache tier of unified mode (CACHE_BACKEND=postgres, seed 002).
-- UNLOGGED: not WAL-logged, so writes are cheap and a crash empties it, which is exactly
-- the durability a cache needs. Expired rows are removed every CACHE_CLEANUP_INTERVAL.
CREATE UNLOGGED TABLE cache_entries (
    key        TEXT PRIMARY KEY,
    value      BYTEA NOT NULL,
    tags       TEXT[] NOT NULL DEFAULT '{}',
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX cache_entries_expires_at ON cache_entries (expires_at);
CREATE INDEX cache_entries_tags ON cache_entries USING GIN (tags);
