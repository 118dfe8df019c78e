-- The interaction log (seed 001's optional MongoDB collection, kept in PostgreSQL): what an
-- account did (linked a citizen, viewed a pattern), appended off the request path in batches
-- by `crates/app/src/interactions.rs`, deleted after `INTERACTIONS_RETENTION`.
--
-- `id` is chosen by the writer, so a batch retried after an answer that never came is not
-- written twice (`ON CONFLICT (id) DO NOTHING`). `created_at` is when the interaction
-- happened, not when the row was written (a batch may wait while PostgreSQL is down).
CREATE TABLE IF NOT EXISTS interactions (
    id               UUID PRIMARY KEY,
    user_id          BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    interaction_type VARCHAR(50) NOT NULL,
    data             JSONB NOT NULL DEFAULT '{}',
    created_at       TIMESTAMPTZ NOT NULL
);
-- An account's own log, newest first (`GET /me/interactions`), and the account's rows when
-- it is deleted.
CREATE INDEX IF NOT EXISTS interactions_user_time
    ON interactions (user_id, created_at DESC, id DESC);
-- Retention: the oldest rows first.
CREATE INDEX IF NOT EXISTS interactions_created_at ON interactions (created_at);
