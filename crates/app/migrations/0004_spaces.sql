-- Collaboration spaces, their participants, and consciousness sessions (seed 000's tables,
-- with the constraints that make the application's invariants hold in the database itself):
--
-- - levels and thresholds are exact decimals in [0, 1] with two decimals (NUMERIC(3,2));
-- - a space never has more participants than its limit: `participant_count` is kept by a
--   trigger on `space_participants` and checked against `max_participants`, so an insert past
--   the limit fails whatever code runs it (the join path also checks first, under the space's
--   row lock, to answer 409 naming the limit);
-- - one active session per user per space (and one not bound to a space): a partial unique
--   index.
--
-- Seed 000's TIMESTAMP columns are TIMESTAMPTZ here: instants, whatever the server's zone.

CREATE TABLE collaboration_spaces (
    id                      SERIAL PRIMARY KEY,
    space_id                VARCHAR(100) UNIQUE NOT NULL
        CHECK (space_id ~ '^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$'),
    creator_id              BIGINT NOT NULL REFERENCES cascade_users (id),
    title                   VARCHAR(255) NOT NULL CHECK (length(title) >= 1),
    description             TEXT NOT NULL DEFAULT '' CHECK (length(description) <= 4000),
    max_participants        INTEGER NOT NULL DEFAULT 10 CHECK (max_participants BETWEEN 1 AND 1000),
    consciousness_threshold NUMERIC(3,2) NOT NULL DEFAULT 0.5
        CHECK (consciousness_threshold BETWEEN 0 AND 1),
    participant_count       INTEGER NOT NULL DEFAULT 0,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    is_active               BOOLEAN NOT NULL DEFAULT true,
    closed_at               TIMESTAMPTZ,
    CONSTRAINT collaboration_spaces_participant_limit
        CHECK (participant_count BETWEEN 0 AND max_participants),
    CONSTRAINT collaboration_spaces_closed_when_inactive
        CHECK (is_active = (closed_at IS NULL))
);
-- `GET /spaces?creator=`: newest first, by creator.
CREATE INDEX collaboration_spaces_creator ON collaboration_spaces (creator_id, id DESC);

CREATE TABLE consciousness_sessions (
    id                  SERIAL PRIMARY KEY,
    user_id             BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    session_token       VARCHAR(255) UNIQUE NOT NULL,
    consciousness_level NUMERIC(3,2) NOT NULL CHECK (consciousness_level BETWEEN 0 AND 1),
    space_id            VARCHAR(100) REFERENCES collaboration_spaces (space_id),
    started_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_activity       TIMESTAMPTZ NOT NULL DEFAULT now(),
    is_active           BOOLEAN NOT NULL DEFAULT true,
    ended_at            TIMESTAMPTZ,
    -- `ended` (DELETE by its user) or `idle` (no heartbeat for CONSCIOUSNESS_SESSION_IDLE).
    end_reason          VARCHAR(20) CHECK (end_reason IN ('ended', 'idle')),
    CONSTRAINT consciousness_sessions_ended_when_inactive
        CHECK (is_active = (ended_at IS NULL) AND is_active = (end_reason IS NULL))
);
-- One active session per user per space; a session bound to no space counts as the space ''.
CREATE UNIQUE INDEX consciousness_sessions_one_active
    ON consciousness_sessions (user_id, (COALESCE(space_id, ''))) WHERE is_active;
-- The idle sweep reads only live sessions.
CREATE INDEX consciousness_sessions_idle
    ON consciousness_sessions (last_activity) WHERE is_active;

-- Who is in a space, through which session: ending the session takes them out.
CREATE TABLE space_participants (
    space_pk   INTEGER NOT NULL REFERENCES collaboration_spaces (id),
    user_id    BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    session_id INTEGER NOT NULL REFERENCES consciousness_sessions (id) ON DELETE CASCADE,
    joined_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (space_pk, user_id)
);
CREATE INDEX space_participants_session ON space_participants (session_id);

-- Keeps `participant_count` equal to the number of rows above, whatever deletes them (a leave,
-- a close, a session's end, an account's removal); the CHECK on the space refuses an insert
-- past `max_participants`.
CREATE FUNCTION space_participants_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE collaboration_spaces SET participant_count = participant_count + 1
         WHERE id = NEW.space_pk;
        RETURN NEW;
    END IF;
    UPDATE collaboration_spaces SET participant_count = participant_count - 1
     WHERE id = OLD.space_pk;
    RETURN OLD;
END
$$;
CREATE TRIGGER space_participants_count
    AFTER INSERT OR DELETE ON space_participants
    FOR EACH ROW EXECUTE FUNCTION space_participants_count();
