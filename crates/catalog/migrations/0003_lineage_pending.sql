-- Lineage into a version that is not (yet) an asset no longer takes effect at once: anyone
-- could give a version someone else was about to publish foreign ancestors, and so keep it
-- from ever being ready. Such edges wait here, attributed to the account that sent them; when
-- the version is published, the publisher's own pending edges move to lineage_edges and the
-- others are dropped. Walks (bundles, readiness, invalidation) never read this table.

CREATE TABLE lineage_pending_edges (
    child_version_id  TEXT NOT NULL,
    parent_version_id TEXT NOT NULL,
    submitted_by      BIGINT NOT NULL REFERENCES cascade_users (id) ON DELETE CASCADE,
    event_id          BIGINT REFERENCES lineage_event_audit (event_id) ON DELETE SET NULL,
    PRIMARY KEY (child_version_id, submitted_by, parent_version_id)
);
-- Deleting an account removes its pending edges (ON DELETE CASCADE) through this index.
CREATE INDEX lineage_pending_edges_submitted_by ON lineage_pending_edges (submitted_by);

-- Existing edges into versions that are not assets become pending under their event's sender.
-- Those whose sender is unknown (events from before catalog migration 2) are dropped: nobody
-- could ever claim them, and they would otherwise give any future publisher their ancestry.
-- The events themselves stay in lineage_event_audit.
INSERT INTO lineage_pending_edges (child_version_id, parent_version_id, submitted_by, event_id)
SELECT e.child_version_id, e.parent_version_id, l.submitted_by, e.event_id
FROM lineage_edges e JOIN lineage_event_audit l USING (event_id)
WHERE l.submitted_by IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM assets a WHERE a.version_id = e.child_version_id);

DELETE FROM lineage_edges e
WHERE NOT EXISTS (SELECT 1 FROM assets a WHERE a.version_id = e.child_version_id);
