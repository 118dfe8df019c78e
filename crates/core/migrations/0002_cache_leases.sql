-- Leases of the PostgreSQL cache tier: which loader may fill a key right now (the same
-- protocol as the Redis tier). Tags are recorded at grant time so a tag invalidation during
-- a load also revokes the lease. UNLOGGED for the same reason as cache_entries.
CREATE UNLOGGED TABLE cache_leases (
    key        TEXT PRIMARY KEY,
    token      TEXT NOT NULL,
    tags       TEXT[] NOT NULL DEFAULT '{}',
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX cache_leases_tags ON cache_leases USING GIN (tags);
