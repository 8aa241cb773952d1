-- Schedules: drills and repository checks that `ferry serve` starts at the
-- times a cron expression names (UTC), with nobody watching.
CREATE TABLE schedules (
    name TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    -- What fires, as JSON: {"drill": {"path": "shop.yaml", ...}} or
    -- {"check": {"read_data": false}}.
    job TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    -- When it fires next. A server claims a firing by moving this forward
    -- from the value it read (compare and set), so two servers sharing a
    -- state fire each time once.
    next_ms BIGINT NOT NULL,
    last_fired_ms BIGINT,
    -- What the last firing started (a run id or a check id), or why it could not.
    last_outcome TEXT
);
CREATE INDEX schedules_next ON schedules (next_ms);
