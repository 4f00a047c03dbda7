-- The relay gives a row up after SFWORKFLOW_RELAY_MAX_ATTEMPTS refused publishes: `failed_at` marks it, and
-- it stays unpublished until an operator republishes it (`sfworkflow outbox republish`).
ALTER TABLE sfworkflow.outbox ADD COLUMN failed_at timestamptz;

-- Due rows in due order: a round reads only rows whose attempt is due, never the backed-off ones before them
-- (outbox_pending_idx on id made every round walk each backed-off row from the lowest id).
DROP INDEX sfworkflow.outbox_pending_idx;
CREATE INDEX outbox_due_idx ON sfworkflow.outbox (next_attempt_at, id) WHERE published_at IS NULL AND failed_at IS NULL;

-- An instance's unpublished rows, for the per-instance order: a row waits while an earlier one is unpublished.
CREATE INDEX outbox_unpublished_instance_idx ON sfworkflow.outbox (instance_id, id)
    WHERE published_at IS NULL AND failed_at IS NULL;

-- The rows given up, for the operator's list and the gauge.
CREATE INDEX outbox_failed_idx ON sfworkflow.outbox (id) WHERE failed_at IS NOT NULL AND published_at IS NULL;
