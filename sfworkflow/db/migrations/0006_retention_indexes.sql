-- The retention sweep finds what is past the retention period by time, through these indexes, instead of
-- reading the whole inbox, outbox and instance tables on every slice.
CREATE INDEX inbox_received_idx ON sfworkflow.inbox (received_at);
CREATE INDEX outbox_published_idx ON sfworkflow.outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX instance_ended_idx ON sfworkflow.instance (updated_at) WHERE terminal;
