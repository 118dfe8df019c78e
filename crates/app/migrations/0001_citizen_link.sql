-- The application's columns of `cascade_users` (seed 001): the Venice citizen an account is
-- linked to, its subscription tier, its Stripe customer, whether it is active, and when it
-- changed. Every existing account is kept: each column is added only when missing (the core's
-- identity migration already made `venice_username` UNIQUE and `subscription_tier`), with a
-- default that fills existing rows.
ALTER TABLE cascade_users
    ADD COLUMN IF NOT EXISTS venice_username    VARCHAR(255),
    ADD COLUMN IF NOT EXISTS subscription_tier  VARCHAR(50) NOT NULL DEFAULT 'observer',
    ADD COLUMN IF NOT EXISTS stripe_customer_id VARCHAR(255),
    ADD COLUMN IF NOT EXISTS is_active          BOOLEAN NOT NULL DEFAULT true,
    ADD COLUMN IF NOT EXISTS created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS venice_linked_at   TIMESTAMPTZ;

-- One account per citizen: the database decides, so two accounts linking one citizen at once
-- cannot both succeed. Where the core's column constraint exists (it has this name), this is a
-- no-op.
CREATE UNIQUE INDEX IF NOT EXISTS cascade_users_venice_username_key
    ON cascade_users (venice_username);
CREATE INDEX IF NOT EXISTS idx_stripe_customer ON cascade_users (stripe_customer_id);
