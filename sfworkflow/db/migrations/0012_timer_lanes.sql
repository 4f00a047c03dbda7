-- Timer lanes: fairness across tenants when timers fall due. A timer's lane is its instance's tenant hashed into 64
-- (sfworkflow.tenant_lane: the low six bits of the tenant id's last byte, random in UUIDv4 and v7 alike). The timer
-- loop takes up to 8 due timers per lane, oldest first, before it fills the rest of a round oldest first across
-- lanes (lock_due_timer_instances): a tenant's 100,000 timers due at one minute no longer hold back another
-- tenant's timer, which fires in the next round unless it shares that tenant's lane (1 in 64).
-- Written by upsert_timers from the instance row; the default only serves rows written by hand.
CREATE OR REPLACE FUNCTION sfworkflow.tenant_lane(tenant uuid) RETURNS smallint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (get_byte(uuid_send(tenant), 15) & 63)::smallint;

ALTER TABLE sfworkflow.timer ADD COLUMN IF NOT EXISTS lane smallint NOT NULL DEFAULT 0;
UPDATE sfworkflow.timer t SET lane = sfworkflow.tenant_lane(i.tenant_id)
FROM sfworkflow.instance i
WHERE i.id = t.instance_id AND t.lane <> sfworkflow.tenant_lane(i.tenant_id);
CREATE INDEX IF NOT EXISTS timer_lane_due_idx ON sfworkflow.timer (lane, due_at);
-- The planner must probe each lane through timer_lane_due_idx. With one tenant's campaign due (every timer in one
-- lane), ANALYZE finds one distinct lane, the planner takes `lane = <each lane>` for no filter at all, and reads
-- timer_due_idx filtered by lane instead: every due timer, for each of the 63 other lanes, 0.5 s a round at 100,000.
-- There are 64 lanes by construction: say so.
ALTER TABLE sfworkflow.timer ALTER COLUMN lane SET (n_distinct = 64);
ANALYZE sfworkflow.timer;
