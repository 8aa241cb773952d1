-- What the console and /metrics show about protection and repository health,
-- written by the processes that know it: `ferry protect` (one row per source,
-- rewritten every few seconds) and `ferry check` (one row per check).
CREATE TABLE protection (
    source TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    -- The protecting process (HOST:PID) and when it last wrote.
    reporter TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    -- The source's status as JSON (lag, backlog, throughput, cycles, last error).
    status TEXT NOT NULL
);
CREATE TABLE repo_checks (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    ok INTEGER NOT NULL,
    read_data INTEGER NOT NULL,
    points BIGINT NOT NULL,
    packs BIGINT NOT NULL,
    chunks BIGINT NOT NULL,
    bytes_read BIGINT NOT NULL,
    problems BIGINT NOT NULL,
    damaged_points BIGINT NOT NULL
);
CREATE INDEX repo_checks_at ON repo_checks (repo, at_ms);
