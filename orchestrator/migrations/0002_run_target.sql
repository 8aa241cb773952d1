-- The target a run rebuilds on (`ferry run --target NAME`): steps that do not
-- name their own target run there. NULL: the runbook's first target.
ALTER TABLE runs ADD COLUMN target TEXT;
