-- The stuck count reads active instances through this index only: (workflow, state) for the states that wait
-- for an operator and the gauge of active instances by state, state_entered_at and id for the instances in
-- their state a while without a pending timer (an index-only scan, anti-joined with the timers). Before, it read
-- every active instance's row and sorted them all: 4 s of PostgreSQL every 30 s at 1M active instances. It
-- replaces the (workflow, state) index: no more entries to write per transition than before.
DROP INDEX sfworkflow.instance_active_idx;
CREATE INDEX instance_active_idx ON sfworkflow.instance (workflow, state, state_entered_at, id) WHERE NOT terminal;
