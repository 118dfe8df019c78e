-- Agents (seed 002): owned by the account that created them; deleted softly (the row stays,
-- with `deleted_at`, so the audit trail's entity ids keep meaning something).

CREATE TABLE agents (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id     BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    type         TEXT NOT NULL CHECK (type ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    config       JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    capabilities TEXT[] NOT NULL DEFAULT '{}',
    status       TEXT NOT NULL CHECK (status IN ('active', 'inactive', 'paused')),
    version      INT NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at   TIMESTAMPTZ
);

-- The owner's live agents, newest first (the list and its cursor).
CREATE INDEX agents_owner_live ON agents (owner_id, id DESC) WHERE deleted_at IS NULL;
-- `capability=` filters.
CREATE INDEX agents_capabilities ON agents USING gin (capabilities) WHERE deleted_at IS NULL;
