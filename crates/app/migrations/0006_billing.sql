-- Stripe billing (issue 16): seed 000's subscriptions table, with what applying Stripe's events
-- in any order needs, and the ids of the events already applied.
CREATE TABLE IF NOT EXISTS cascade_subscriptions (
    id                     SERIAL PRIMARY KEY,
    user_id                BIGINT REFERENCES cascade_users (id) ON DELETE SET NULL,
    stripe_subscription_id VARCHAR(255) UNIQUE,
    status                 VARCHAR(50) NOT NULL,
    tier                   VARCHAR(50) NOT NULL,
    current_period_start   TIMESTAMP,
    current_period_end     TIMESTAMP,
    created_at             TIMESTAMP DEFAULT NOW()
);

-- Added when missing, so a table made from the seed's DDL is kept. `object_at` and
-- `status_at`: Stripe's `created` (Unix seconds) of the event the object fields and the status
-- came from; an older event never overwrites a newer one (see billing::webhook).
ALTER TABLE cascade_subscriptions
    ADD COLUMN IF NOT EXISTS stripe_customer_id VARCHAR(255),
    ADD COLUMN IF NOT EXISTS stripe_price_id    VARCHAR(255) NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS object_at          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS status_at          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS updated_at         TIMESTAMPTZ NOT NULL DEFAULT now();

CREATE INDEX IF NOT EXISTS cascade_subscriptions_user ON cascade_subscriptions (user_id);
CREATE INDEX IF NOT EXISTS cascade_subscriptions_customer
    ON cascade_subscriptions (stripe_customer_id);

-- One row per Stripe event applied, written in the transaction of its effect: the unique key
-- makes a redelivery (even a concurrent one) a no-op.
CREATE TABLE IF NOT EXISTS cascade_stripe_events (
    event_id      VARCHAR(255) PRIMARY KEY,
    event_type    VARCHAR(100) NOT NULL,
    event_created BIGINT NOT NULL,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Stripe's `created` is in whole seconds: two subscription events of one second are ordered
-- by how far along a subscription's life their status is (a payment failing and the
-- subscription going unpaid in one second ends unpaid, not past_due).
CREATE OR REPLACE FUNCTION cascade_status_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE status
        WHEN 'incomplete' THEN 0
        WHEN 'trialing' THEN 1
        WHEN 'active' THEN 2
        WHEN 'past_due' THEN 3
        WHEN 'unpaid' THEN 4
        WHEN 'incomplete_expired' THEN 5
        WHEN 'canceled' THEN 6
        ELSE 2
    END
$$;
