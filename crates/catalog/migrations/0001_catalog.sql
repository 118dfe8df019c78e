-- The catalog module (seed 003): producers publish versioned assets; policies and receipts
-- make an asset version usable; OpenLineage run events record how versions derive from one
-- another. lineage_edges is derived from lineage_event_audit (inputs -> outputs) so that the
-- bundle and readiness queries walk an indexed edge list instead of re-reading events.

CREATE TABLE producers (
    producer_id TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE assets (
    version_id  TEXT PRIMARY KEY,
    producer_id TEXT NOT NULL REFERENCES producers (producer_id),
    name        TEXT NOT NULL,
    metadata    JSONB NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Text search of GET /listings?q=: the name and the metadata's description.
    search      TSVECTOR GENERATED ALWAYS AS (
                    to_tsvector('simple', name || ' ' || coalesce(metadata ->> 'description', ''))
                ) STORED
);
-- GET /listings pages newest first with a (created_at, version_id) cursor, optionally by producer.
CREATE INDEX assets_listing ON assets (created_at DESC, version_id DESC);
CREATE INDEX assets_producer_listing ON assets (producer_id, created_at DESC, version_id DESC);
CREATE INDEX assets_search ON assets USING GIN (search);

-- Usage policy documents attached to an asset version; valid until expires_at (NULL: no end).
CREATE TABLE policies (
    policy_id  BIGSERIAL PRIMARY KEY,
    version_id TEXT NOT NULL REFERENCES assets (version_id) ON DELETE CASCADE,
    document   JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ
);
CREATE INDEX policies_version ON policies (version_id);

-- Payment receipts for an asset version; valid until expires_at (NULL: no end).
CREATE TABLE receipts (
    receipt_id BIGSERIAL PRIMARY KEY,
    version_id TEXT NOT NULL REFERENCES assets (version_id) ON DELETE CASCADE,
    payer      TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ
);
CREATE INDEX receipts_version ON receipts (version_id);

-- Every accepted OpenLineage run event, as received.
CREATE TABLE lineage_event_audit (
    event_id    BIGSERIAL PRIMARY KEY,
    run_id      TEXT NOT NULL,
    event_type  TEXT,
    event_time  TIMESTAMPTZ NOT NULL,
    job_namespace TEXT NOT NULL,
    job_name    TEXT NOT NULL,
    producer    TEXT NOT NULL,
    event       JSONB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX lineage_event_audit_run ON lineage_event_audit (run_id);

-- parent -> child between asset versions, derived from events (inputs -> outputs). No foreign
-- keys: lineage may name versions not (yet) in the catalog; readiness reports them missing.
-- Cycles are possible (events are not trusted); every walk is depth-bounded.
CREATE TABLE lineage_edges (
    child_version_id  TEXT NOT NULL,
    parent_version_id TEXT NOT NULL,
    event_id          BIGINT REFERENCES lineage_event_audit (event_id) ON DELETE SET NULL,
    PRIMARY KEY (child_version_id, parent_version_id)
);
-- Descendant walks (which cached bundles a write affects) go parent -> child.
CREATE INDEX lineage_edges_parent ON lineage_edges (parent_version_id, child_version_id);
