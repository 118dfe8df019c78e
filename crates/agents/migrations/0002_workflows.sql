-- Workflows (ordered steps, each naming a capability and its input) and their executions:
-- a queue in PostgreSQL. Workers claim queued rows with FOR UPDATE SKIP LOCKED, heartbeat
-- their claims, and complete them; a claim whose heartbeat lapsed is rescued.

CREATE TABLE workflows (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id   BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    name       TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    steps      JSONB NOT NULL CHECK (jsonb_typeof(steps) = 'array'),
    version    INT NOT NULL DEFAULT 1,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at TIMESTAMPTZ
);
CREATE INDEX workflows_owner_live ON workflows (owner_id, id DESC) WHERE deleted_at IS NULL;

-- Rows change state several times in their short life: room on each page for the new
-- versions (HOT updates, fillfactor), and vacuum that keeps up with the churn instead of
-- waiting for 20 % of the table to be dead.
CREATE TABLE executions (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id      BIGINT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    owner_id         BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    state            TEXT NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- The workflow's steps as they were when the execution was enqueued.
    steps            JSONB NOT NULL,
    input            JSONB NOT NULL DEFAULT '{}',
    attempt          INT NOT NULL DEFAULT 0,
    max_attempts     INT NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    -- Not claimed before this time (a retry's backoff).
    run_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by       TEXT,
    heartbeat_at     TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    result           JSONB,
    error            TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Partial indexes on the live states only: a claim reads the oldest due queued rows, a
-- rescue the running rows by heartbeat; finished rows (most of the table) are in neither.
CREATE INDEX executions_queued ON executions (run_at, id) WHERE state = 'queued';
CREATE INDEX executions_running ON executions (heartbeat_at) WHERE state = 'running';
CREATE INDEX executions_finished ON executions (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX executions_workflow ON executions (workflow_id, id DESC);
