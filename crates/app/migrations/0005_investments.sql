-- Investments in collaboration spaces (seed 000's economic bridge), and the idempotency keys
-- that make POST /investments happen once per key.

CREATE TABLE app_idempotency_keys (
    user_id      BIGINT NOT NULL REFERENCES cascade_users(id) ON DELETE CASCADE,
    scope        TEXT NOT NULL,            -- the route, e.g. 'POST /investments'
    key          TEXT NOT NULL,
    request_hash BYTEA NOT NULL,           -- SHA-256 of the request's meaning
    status       SMALLINT NOT NULL,        -- the stored response (0 until it is written)
    body         TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, scope, key)
);
CREATE INDEX app_idempotency_keys_created ON app_idempotency_keys (created_at);

-- Amounts exact, two decimals, gross = fee + net in each currency (checked here too).
CREATE TABLE investments (
    id             BIGSERIAL PRIMARY KEY,
    user_id        BIGINT NOT NULL REFERENCES cascade_users(id),
    space_id       VARCHAR(100) NOT NULL REFERENCES collaboration_spaces(space_id),
    given_currency TEXT NOT NULL CHECK (given_currency IN ('usd', 'ducats')),
    usd_gross      NUMERIC(24, 2) NOT NULL CHECK (usd_gross > 0),
    usd_fee        NUMERIC(24, 2) NOT NULL CHECK (usd_fee >= 0),
    usd_net        NUMERIC(24, 2) NOT NULL,
    ducats_gross   NUMERIC(24, 2) NOT NULL CHECK (ducats_gross > 0),
    ducats_fee     NUMERIC(24, 2) NOT NULL CHECK (ducats_fee >= 0),
    ducats_net     NUMERIC(24, 2) NOT NULL,
    rate           NUMERIC NOT NULL,
    fee_percent    NUMERIC NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (usd_gross = usd_fee + usd_net),
    CHECK (ducats_gross = ducats_fee + ducats_net)
);
CREATE INDEX investments_user ON investments (user_id, id DESC);
CREATE INDEX investments_space ON investments (space_id);
