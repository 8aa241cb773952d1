-- The fleet: one-time enrollment tokens and the agents they enrolled.
-- Secrets are stored only as SHA-256 hashes (they are random, 192 bits).
CREATE TABLE agent_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    -- The policy an agent enrolled with it starts with, as JSON (fields left
    -- out are filled at enrollment from what the machine reports).
    policy TEXT NOT NULL,
    -- Set once, by the enrollment that used it (compare and set).
    used_ms BIGINT,
    used_by TEXT
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    -- What the machine reported at enrollment, as JSON.
    devices TEXT NOT NULL,
    -- What it protects, how often and where to, as JSON.
    policy TEXT NOT NULL,
    enrolled_ms BIGINT NOT NULL,
    enrolled_with TEXT NOT NULL,
    last_seen_ms BIGINT,
    -- The last status it pushed, as JSON.
    status TEXT,
    revoked_ms BIGINT,
    revoked_by TEXT
);
