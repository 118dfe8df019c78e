-- Invalidations an instance could not deliver to Redis or announce on the cache bus, kept
-- where every instance can read them even if the writer dies (`core/src/cache/log.rs`). A
-- logged table, not UNLOGGED like the cache's: a crash must not forget them. Written right
-- after the write's transaction, before the write is acknowledged; delivered (deleted from
-- Redis, announced on the bus) by the first instance that reads it and can reach Redis, or by
-- the writer's own replay. Delivered rows are pruned after an hour; undelivered ones once older
-- than the longest cache TTL (every entry they name has expired by then).
CREATE TABLE cache_invalidation_log (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- CACHE_KEY_PREFIX of the deployment that wrote it: deployments sharing a database
    -- read only their own rows.
    key_prefix   TEXT NOT NULL,
    -- Full keys as every tier names them (`<key name>:<key>`), and tags (a namespace is its
    -- tag `ns:<namespace>`).
    keys         TEXT[] NOT NULL DEFAULT '{}',
    tags         TEXT[] NOT NULL DEFAULT '{}',
    -- The writing instance's bus id, and when.
    written_by   TEXT NOT NULL,
    written_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_by TEXT,
    delivered_at TIMESTAMPTZ
);
-- What every instance reads (on each notification, doubt and poll): the undelivered rows of
-- its prefix. Partial, so its size is what is undelivered, not the table's history.
CREATE INDEX cache_invalidation_log_undelivered
    ON cache_invalidation_log (key_prefix, id) WHERE delivered_at IS NULL;
CREATE INDEX cache_invalidation_log_delivered_at
    ON cache_invalidation_log (delivered_at) WHERE delivered_at IS NOT NULL;
