-- Catalog writes are authorised: a producer belongs to the account that registered it, and
-- only that account may publish, change or delete its assets, grant their receipts and
-- policies, and record lineage into them. Producers from before this migration (or seeded
-- without --owner) have no owner and cannot be changed over the API until one is set.

ALTER TABLE producers
    ADD COLUMN owner_id BIGINT REFERENCES cascade_users (id) ON DELETE SET NULL;
CREATE INDEX producers_owner ON producers (owner_id);

-- Who reported each OpenLineage event.
ALTER TABLE lineage_event_audit
    ADD COLUMN submitted_by BIGINT REFERENCES cascade_users (id) ON DELETE SET NULL;
