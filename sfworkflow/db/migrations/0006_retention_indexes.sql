-- The retention sweep finds what is past the retention period by time, through these indexes, instead of
-- reading the whole inbox, outbox and instance tables on every slice. The inbox and the outbox are written
-- in time order, so a BRIN index (a few pages, one summary per range of 128 pages) serves their sweep at
-- almost no cost per event; a B-tree on each cost 5-10 % of the drain benchmark's events/s (one more index
-- entry per event and per published message). Ended instances are few per page among the active ones: a
-- partial B-tree.
CREATE INDEX inbox_received_idx ON sfworkflow.inbox USING brin (received_at) WITH (autosummarize = on);
CREATE INDEX outbox_published_idx ON sfworkflow.outbox USING brin (published_at) WITH (autosummarize = on);
CREATE INDEX instance_ended_idx ON sfworkflow.instance (updated_at) WHERE terminal;
