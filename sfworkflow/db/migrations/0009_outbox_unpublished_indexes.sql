-- The indexes of unpublished outbox rows cover every unpublished row, given up or not (0007 left the given-up
-- ones out): then any statement on unpublished rows can use them, whatever it says about failed_at. With
-- 0007's predicates, `published_at IS NULL` alone (the demo's and the benchmarks' "is everything published?")
-- could use no index and read the whole outbox: 0.5 to 1 s at a million rows, several times a second. Rows given
-- up are few; the relay's statements filter them out.
DROP INDEX sfworkflow.outbox_due_idx;
CREATE INDEX outbox_due_idx ON sfworkflow.outbox (next_attempt_at, id) WHERE published_at IS NULL;
DROP INDEX sfworkflow.outbox_unpublished_instance_idx;
CREATE INDEX outbox_unpublished_instance_idx ON sfworkflow.outbox (instance_id, id) WHERE published_at IS NULL;
