-- The status page counts dead letters by reason over the retention period: index them by time.
CREATE INDEX outbox_dead_letter_idx ON sfworkflow.outbox (created_at) WHERE kind = 'dead_letter';
