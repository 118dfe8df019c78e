-- Memory snapshots of an agent: append-only (no API changes one), read latest first, each at
-- most AGENTS_MEMORY_MAX_BYTES, the newest AGENTS_MEMORY_RETENTION kept per agent.

CREATE TABLE agent_memories (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent_id   BIGINT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    data       JSONB NOT NULL,
    size_bytes INT NOT NULL CHECK (size_bytes >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX agent_memories_latest ON agent_memories (agent_id, id DESC);
