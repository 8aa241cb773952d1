-- Runs, their append-only event logs, commands queued by other processes,
-- and the recovery points drills proved. `IF NOT EXISTS`: states made before
-- migrations moved to sqlx already have these tables.
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    runbook TEXT NOT NULL,
    file TEXT NOT NULL,
    source TEXT NOT NULL,
    params TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    git_commit TEXT,
    repo TEXT,
    work_dir TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    owner TEXT,
    lease_ms BIGINT
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    done_ms BIGINT
);
CREATE INDEX IF NOT EXISTS commands_open ON commands (run_id, done_ms);
CREATE TABLE IF NOT EXISTS verified_points (
    repo TEXT NOT NULL,
    point TEXT NOT NULL,
    source TEXT NOT NULL,
    point_time TEXT NOT NULL,
    run_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (repo, point, run_id)
);
