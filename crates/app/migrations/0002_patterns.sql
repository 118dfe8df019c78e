-- Consciousness patterns (seed 001's `consciousness_patterns`): what Cascade computed from
-- Venice's lists for each pattern type, kept until `expires_at`, then read from Venice again.
-- One row per type (the UNIQUE key the upsert needs); `content_hash` (MD5 of the data's jsonb
-- text) tells a refresh whether the content changed, which bumps `version` and `changed_at`.
CREATE TABLE IF NOT EXISTS consciousness_patterns (
    id            BIGSERIAL PRIMARY KEY,
    pattern_type  VARCHAR(100) NOT NULL,
    venice_source VARCHAR(255) NOT NULL,
    pattern_data  JSONB NOT NULL,
    cached_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL
);

-- A table made from seed 001's script has no key, nullable columns and no time zone. Its rows
-- are copies of Venice data that the next read makes again: incomplete ones and all but the
-- newest of each type go, so the key below can be made.
ALTER TABLE consciousness_patterns
    ADD COLUMN IF NOT EXISTS content_hash TEXT NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS version      BIGINT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS changed_at   TIMESTAMPTZ NOT NULL DEFAULT now();
DELETE FROM consciousness_patterns
 WHERE pattern_type IS NULL OR venice_source IS NULL OR pattern_data IS NULL
    OR cached_at IS NULL OR expires_at IS NULL;
DELETE FROM consciousness_patterns p
 USING consciousness_patterns q
 WHERE p.pattern_type = q.pattern_type AND (p.cached_at, p.id) < (q.cached_at, q.id);
ALTER TABLE consciousness_patterns
    ALTER COLUMN pattern_type  SET NOT NULL,
    ALTER COLUMN venice_source SET NOT NULL,
    ALTER COLUMN pattern_data  SET NOT NULL,
    ALTER COLUMN cached_at     SET NOT NULL,
    ALTER COLUMN expires_at    SET NOT NULL,
    ALTER COLUMN cached_at     TYPE TIMESTAMPTZ,
    ALTER COLUMN expires_at    TYPE TIMESTAMPTZ;

CREATE UNIQUE INDEX IF NOT EXISTS consciousness_patterns_type_key
    ON consciousness_patterns (pattern_type);
-- The background sync's question: which patterns expire soon.
CREATE INDEX IF NOT EXISTS idx_consciousness_patterns_expires_at
    ON consciousness_patterns (expires_at);
