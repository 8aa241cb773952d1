-- What `ferry plan` would have said of a run when it was created (JSON of
-- `forecast::Forecast`): its report sets the predicted RTO and cost against
-- what was measured. NULL for runs created before this column, or when the
-- forecast could not be made.
ALTER TABLE runs ADD COLUMN forecast TEXT;
