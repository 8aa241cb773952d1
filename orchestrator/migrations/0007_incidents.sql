-- Incidents: Alertmanager alert groups that started a run (POST
-- /api/hooks/alertmanager). One row per group key; a group starts a run
-- once while it is open, and again only after it was resolved.
CREATE TABLE incidents (
    group_key TEXT PRIMARY KEY,
    -- The runbook file the matching route names.
    runbook TEXT NOT NULL,
    opened_ms BIGINT NOT NULL,
    -- The run it started (absent while it is being started).
    run_id TEXT,
    resolved_ms BIGINT
);
