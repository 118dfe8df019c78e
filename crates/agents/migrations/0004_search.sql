-- Search across types (GET /search): full-text search with English stemming and ranking
-- (`search`, names weighted above the rest) plus trigram matching on names for typos and
-- prefixes (pg_trgm's `<%` and `<<%`, both index-backed at their default thresholds).

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- array_to_string is only STABLE (it calls the elements' output functions), and a generated
-- column needs an IMMUTABLE expression: for text[] the result cannot change.
CREATE FUNCTION agents_words(words TEXT[]) RETURNS TEXT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT array_to_string(words, ' ') $$;

ALTER TABLE agents ADD COLUMN search TSVECTOR GENERATED ALWAYS AS (
    setweight(to_tsvector('english', name), 'A')
    || setweight(to_tsvector('english', type || ' ' || agents_words(capabilities)), 'B')
) STORED;
CREATE INDEX agents_search ON agents USING gin (search) WHERE deleted_at IS NULL;
CREATE INDEX agents_name_trgm ON agents USING gin (name gin_trgm_ops) WHERE deleted_at IS NULL;

ALTER TABLE workflows ADD COLUMN search TSVECTOR GENERATED ALWAYS AS (
    setweight(to_tsvector('english', name), 'A')
    || setweight(to_tsvector('english', jsonb_path_query_array(steps, '$[*].capability')), 'B')
) STORED;
CREATE INDEX workflows_search ON workflows USING gin (search) WHERE deleted_at IS NULL;
CREATE INDEX workflows_name_trgm ON workflows USING gin (name gin_trgm_ops)
    WHERE deleted_at IS NULL;
