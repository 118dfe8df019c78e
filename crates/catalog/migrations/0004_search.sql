-- GET /listings?q= and GET /search: English stemming ("price" finds "Prices"; migration 1
-- used the `simple` configuration, which does not stem), names weighted above descriptions
-- for ranking, and trigram matching on names for typos and prefixes (pg_trgm's `<%` and
-- `<<%`, index-backed at their default thresholds). A generated column's expression cannot be
-- altered before PostgreSQL 17: the column is replaced (its index goes with it).

CREATE EXTENSION IF NOT EXISTS pg_trgm;

ALTER TABLE assets DROP COLUMN search;
ALTER TABLE assets ADD COLUMN search TSVECTOR GENERATED ALWAYS AS (
    setweight(to_tsvector('english', name), 'A')
    || setweight(to_tsvector('english', coalesce(metadata ->> 'description', '')), 'B')
) STORED;
CREATE INDEX assets_search ON assets USING gin (search);
CREATE INDEX assets_name_trgm ON assets USING gin (name gin_trgm_ops);
