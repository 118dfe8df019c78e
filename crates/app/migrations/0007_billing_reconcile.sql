-- Stripe reconciliation (issue 16 item 4): one row, the cursor of the events listing (Stripe's
-- `created`, Unix seconds: the next run lists events created at or after it) and when a run
-- last finished. A run holds the row locked (FOR UPDATE SKIP LOCKED): one run cluster-wide.
CREATE TABLE IF NOT EXISTS cascade_stripe_reconcile (
    id          BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    cursor      BIGINT NOT NULL DEFAULT 0,
    finished_at TIMESTAMPTZ
);

INSERT INTO cascade_stripe_reconcile (id) VALUES (TRUE) ON CONFLICT (id) DO NOTHING;
