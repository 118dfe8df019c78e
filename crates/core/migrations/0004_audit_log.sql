-- The audit log: one row per change, written in the transaction of the change (so a change
-- that rolls back leaves no row, and a row that cannot be written rolls the change back).
-- Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE for every role, the table's
-- owner included, so no API (and no bug) can rewrite history.

CREATE TABLE audit_log (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- Who: `user:<id>` for an account, `system:<component>` for the server itself.
    actor       TEXT NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    -- What: `<entity>.<verb>`, e.g. `agent.create`.
    action      TEXT NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    entity_type TEXT NOT NULL CHECK (length(entity_type) BETWEEN 1 AND 100),
    entity_id   TEXT NOT NULL CHECK (length(entity_id) BETWEEN 1 AND 200),
    before      JSONB,
    after       JSONB,
    -- The `x-request-id` of the request that made the change, when there was one.
    request_id  TEXT
);

CREATE INDEX audit_log_actor ON audit_log (actor, id);
CREATE INDEX audit_log_entity ON audit_log (entity_type, entity_id, id);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_no_update_or_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
