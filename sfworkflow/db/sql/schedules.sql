-- Schedules (db/schedules.py runs these): the loop that fires them, code-declared ones upserted at start-up, and the
-- operator's list, add, pause, resume, delete and trigger. Each block: `-- name --`, one line saying what it does,
-- the SQL. Names are unique across the directory's files.

-- lock_due_schedules --
-- Up to $1 schedules due now (due_at: the next tick with its jitter), locked; rows another replica holds are
-- skipped. `now` is the database's clock, the one every replica shares. (now() is the transaction's start, a
-- constant the index on due_at can be searched with; clock_timestamp() is volatile and could not.)
SELECT s.*, clock_timestamp() AS now
FROM sfworkflow.schedule s
WHERE NOT s.paused AND s.due_at <= now()
ORDER BY s.due_at
LIMIT $1
FOR UPDATE SKIP LOCKED

-- advance_schedules --
-- After a round fired their ticks: each schedule's next tick, when it was fired and how many it fired and missed.
UPDATE sfworkflow.schedule s
SET next_tick_at = u.next_tick_at, due_at = u.due_at,
    last_tick_at = COALESCE(u.last_tick_at, s.last_tick_at),
    last_fired_at = CASE WHEN u.fired > 0 THEN u.fired_at ELSE s.last_fired_at END,
    fired = s.fired + u.fired, missed = s.missed + u.missed
FROM jsonb_to_recordset($1::text::jsonb) AS u(tenant_id uuid, name text, next_tick_at timestamptz, due_at timestamptz,
                                        last_tick_at timestamptz, fired_at timestamptz, fired int, missed int)
WHERE s.tenant_id = u.tenant_id AND s.name = u.name

-- pause_broken_schedule --
-- A schedule its row cannot describe any more (a time zone this machine's tz database lacks): paused, with why.
UPDATE sfworkflow.schedule
SET paused = true, reason = $3, updated_by = 'sfworkflow', updated_at = now()
WHERE tenant_id = $1::uuid AND name = $2

-- upsert_code_schedules --
-- The schedules the loaded definitions declare, under the nil tenant. A new one waits for its first tick; a changed
-- one waits for its new expression's first tick (next_tick_at and due_at as given); an unchanged one keeps where it
-- waits. Paused stays paused: an operator's choice outlives a deploy.
INSERT INTO sfworkflow.schedule AS s (tenant_id, name, kind, event_type, entity_id, data, cron, every_s, anchor,
                                      timezone, jitter_s, catch_up, max_catch_up, next_tick_at, due_at, source,
                                      workflow, description, updated_by, reason)
SELECT u.tenant_id, u.name, u.kind, u.event_type, u.entity_id, u.data, u.cron, u.every_s, u.anchor, u.timezone,
       u.jitter_s, u.catch_up, u.max_catch_up, u.next_tick_at, u.due_at, 'code', u.workflow, u.description,
       'sfworkflow', 'declared by the workflow definition'
FROM jsonb_to_recordset($1::text::jsonb) AS u(tenant_id uuid, name text, kind text, event_type text, entity_id text,
                                        data jsonb, cron text, every_s int, anchor timestamptz, timezone text,
                                        jitter_s float8, catch_up text, max_catch_up int, next_tick_at timestamptz,
                                        due_at timestamptz, workflow text, description text)
ON CONFLICT (tenant_id, name) DO UPDATE SET
    kind = EXCLUDED.kind, event_type = EXCLUDED.event_type, entity_id = EXCLUDED.entity_id, data = EXCLUDED.data,
    cron = EXCLUDED.cron, every_s = EXCLUDED.every_s, anchor = EXCLUDED.anchor, timezone = EXCLUDED.timezone,
    jitter_s = EXCLUDED.jitter_s, catch_up = EXCLUDED.catch_up, max_catch_up = EXCLUDED.max_catch_up,
    next_tick_at = CASE WHEN (s.cron, s.every_s, s.anchor, s.timezone, s.jitter_s)
                             IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.every_s, EXCLUDED.anchor, EXCLUDED.timezone,
                                               EXCLUDED.jitter_s)
                        THEN EXCLUDED.next_tick_at ELSE s.next_tick_at END,
    due_at = CASE WHEN (s.cron, s.every_s, s.anchor, s.timezone, s.jitter_s)
                       IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.every_s, EXCLUDED.anchor, EXCLUDED.timezone,
                                         EXCLUDED.jitter_s)
                  THEN EXCLUDED.due_at ELSE s.due_at END,
    source = 'code', workflow = EXCLUDED.workflow, description = EXCLUDED.description, updated_at = now()
WHERE (s.kind, s.event_type, s.entity_id, s.data, s.cron, s.every_s, s.anchor, s.timezone, s.jitter_s, s.catch_up,
       s.max_catch_up, s.source, s.workflow, s.description)
      IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.event_type, EXCLUDED.entity_id, EXCLUDED.data, EXCLUDED.cron,
                        EXCLUDED.every_s, EXCLUDED.anchor, EXCLUDED.timezone, EXCLUDED.jitter_s, EXCLUDED.catch_up,
                        EXCLUDED.max_catch_up, 'code', EXCLUDED.workflow, EXCLUDED.description)

-- pause_undeclared_schedules --
-- Code-declared schedules the loaded definitions no longer declare ($1: the names they do): paused, saying why,
-- rather than deleted (a replica of the previous release may still declare them during a rolling deploy). The
-- names paused now.
UPDATE sfworkflow.schedule
SET paused = true, updated_by = 'sfworkflow', updated_at = now(),
    reason = 'no longer declared by the loaded definitions: paused at start-up; delete it if it is gone for good'
WHERE source = 'code' AND NOT paused AND NOT (name = ANY($1::text[]))
RETURNING name

-- list_schedules --
-- Every schedule ($1: of one tenant, or NULL for all), by tenant and name.
SELECT * FROM sfworkflow.schedule
WHERE ($1::uuid IS NULL OR tenant_id = $1::uuid)
ORDER BY tenant_id, name

-- get_schedule --
-- One schedule (none when there is none).
SELECT * FROM sfworkflow.schedule WHERE tenant_id = $1::uuid AND name = $2

-- lock_schedule --
-- One schedule, locked for an operator's change (the loop skips it meanwhile).
SELECT *, clock_timestamp() AS now FROM sfworkflow.schedule WHERE tenant_id = $1::uuid AND name = $2 FOR UPDATE

-- insert_schedule --
-- A run-time schedule (source api); nothing when one of that tenant and name exists (the caller says so).
INSERT INTO sfworkflow.schedule (tenant_id, name, kind, event_type, entity_id, data, cron, every_s, anchor, timezone,
                                 jitter_s, catch_up, max_catch_up, next_tick_at, due_at, source, description,
                                 updated_by, reason)
VALUES ($1::uuid, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'api', $16, $17, $18)
ON CONFLICT (tenant_id, name) DO NOTHING
RETURNING *

-- set_schedule_paused --
-- Pause or resume a schedule ($3); resuming waits for the first tick after now ($4, $5: next_tick_at, due_at), the
-- ticks that fell while it was paused are not fired. The stored row.
UPDATE sfworkflow.schedule
SET paused = $3, next_tick_at = COALESCE($4, next_tick_at), due_at = COALESCE($5, due_at), updated_by = $6,
    reason = $7, updated_at = now()
WHERE tenant_id = $1::uuid AND name = $2
RETURNING *

-- delete_schedule --
-- Remove a schedule: a run-time one, or a code-declared one the loaded definitions no longer declare ($3: the
-- names they do); the removed row (none when there was none, or it is still declared). Its ticks already queued
-- still go out.
DELETE FROM sfworkflow.schedule
WHERE tenant_id = $1::uuid AND name = $2 AND (source = 'api' OR NOT (name = ANY($3::text[])))
RETURNING *

-- count_schedule_fired --
-- A tick fired by hand: counted, and when.
UPDATE sfworkflow.schedule SET fired = fired + 1, last_fired_at = clock_timestamp()
WHERE tenant_id = $1::uuid AND name = $2
RETURNING *

-- database_now --
-- The database's clock, the one the schedule loop fires by.
SELECT clock_timestamp()
