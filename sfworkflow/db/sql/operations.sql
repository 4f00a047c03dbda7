-- What the operator tools (ops/, cli/), the admin API, the status page, the service's gauges and the demo read
-- and write, by name (db/operations.py runs them). Each block: `-- name --`, one line saying what it does, the
-- SQL. The event path's queries are in queries.sql; names are unique across both files.

-- ping --
-- One round trip to PostgreSQL (readiness).
SELECT 1

-- stuck_candidates --
-- Active instances that may be stuck (in their state a while without a pending timer, a timer overdue, or
-- waiting for an operator), with their earliest timer and latest command; optional filters are NULL when not
-- given. $5: the shortest no-progress age, $6: the timer grace (seconds), $7/$8: the (workflow, state) pairs that
-- wait for an operator, $10-$13: each (workflow, version, state) loaded with its own no-progress age (core/stuck.py
-- state_ages). An instance with a pending timer counts by that timer only (core/stuck.py), so one
-- waiting for a timer not yet overdue is never a candidate, however long it has been in its state. The
-- candidates are found through indexes (overdue timers, the operator states, and an index-only scan of active
-- instances anti-joined with the timers), never by reading every active instance's row.
WITH candidate AS (
    SELECT t.instance_id AS id FROM sfworkflow.timer t
    WHERE t.due_at < now() - make_interval(secs => $6) AND t.lane < 64  -- every lane: timer_due_idx's predicate
    UNION
    SELECT a.id FROM sfworkflow.instance a
    WHERE NOT a.terminal AND (a.workflow, a.state) IN (SELECT * FROM unnest($7::text[], $8::text[]))
    UNION
    SELECT a.id FROM sfworkflow.instance a
    LEFT JOIN unnest($10::text[], $11::int[], $12::text[], $13::float8[]) AS r(workflow, version, state, after_s)
      ON r.workflow = a.workflow AND r.version = a.definition_version AND r.state = a.state
    WHERE NOT a.terminal AND a.state_entered_at < now() - make_interval(secs => $5)
      -- past its own state's threshold (r.after_s NULL: never by age); a version or state not loaded: past $5
      AND a.state_entered_at < now() - make_interval(secs => CASE WHEN r.state IS NULL THEN $5 ELSE r.after_s END)
      AND NOT EXISTS (SELECT 1 FROM sfworkflow.timer t WHERE t.instance_id = a.id)
      -- its messages waited for a rate limit's slot until less than the shortest age ago: not stuck yet, and not
      -- to crowd the stuck ones out of the limit
      AND (a.deferred_until IS NULL OR a.deferred_until < now() - make_interval(secs => $5))
      -- a command of it waits for a concurrency slot: not stuck (sfworkflow_slots_waiting counts those)
      AND NOT EXISTS (SELECT 1 FROM sfworkflow.outbox g WHERE g.instance_id = a.id AND g.next_attempt_at = 'infinity'
                        AND g.published_at IS NULL AND g.failed_at IS NULL))
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context, i.version, i.terminal,
       i.state_entered_at, i.updated_at, i.last_event_type, i.parked_count, i.deferred_until, t.next_due, t.timer_name,
       c.routing_key AS command_type, c.body AS command_body, c.published_at AS command_published_at,
       c.deferred_until AS command_deferred_until, c.deferred_by AS command_deferred_by
FROM candidate k
JOIN sfworkflow.instance i ON i.id = k.id
LEFT JOIN LATERAL (
    SELECT due_at AS next_due, name AS timer_name FROM sfworkflow.timer WHERE instance_id = i.id
    ORDER BY due_at LIMIT 1) t ON true
LEFT JOIN LATERAL (
    SELECT routing_key, body, published_at, deferred_until, deferred_by FROM sfworkflow.outbox
    WHERE instance_id = i.id AND kind = 'command' ORDER BY id DESC LIMIT 1) c ON true
WHERE NOT i.terminal
  AND ($1::text IS NULL OR i.workflow = $1)
  AND ($2::uuid IS NULL OR i.tenant_id = $2)
  AND ($3::text IS NULL OR i.state = $3)
  AND ($4::text IS NULL OR i.entity_id = $4)
ORDER BY i.state_entered_at
LIMIT $9

-- stuck_instance --
-- One named instance, terminal or not, stuck or not, with its earliest timer and latest command.
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context, i.version, i.terminal,
       i.state_entered_at, i.updated_at, i.last_event_type, i.parked_count, i.deferred_until, t.next_due, t.timer_name,
       c.routing_key AS command_type, c.body AS command_body, c.published_at AS command_published_at,
       c.deferred_until AS command_deferred_until, c.deferred_by AS command_deferred_by
FROM sfworkflow.instance i
LEFT JOIN LATERAL (
    SELECT due_at AS next_due, name AS timer_name FROM sfworkflow.timer WHERE instance_id = i.id
    ORDER BY due_at LIMIT 1) t ON true
LEFT JOIN LATERAL (
    SELECT routing_key, body, published_at, deferred_until, deferred_by FROM sfworkflow.outbox
    WHERE instance_id = i.id AND kind = 'command' ORDER BY id DESC LIMIT 1) c ON true
WHERE i.tenant_id = $1::uuid AND i.workflow = $2 AND i.entity_id = $3

-- settled_condition --
-- Not a query: the condition "settled" (terminal, or waiting for an operator; $1/$2 the operator states' parallel
-- lists) for SQL written outside the package (bench/), which adds it to its own statements.
(terminal OR (workflow, state) IN (SELECT * FROM unnest($1::text[], $2::text[])))

-- instance_by_key --
-- One instance, every column, by its key.
SELECT * FROM sfworkflow.instance WHERE tenant_id = $1 AND workflow = $2 AND entity_id = $3

-- parked_of_key --
-- The events parked for one instance key (the instance may not exist yet), in parking order.
SELECT event_id, event_type, reason, parked_at, deadline FROM sfworkflow.parked
WHERE tenant_id = $1 AND workflow = $2 AND entity_id = $3 ORDER BY id

-- history_of_instance --
-- One instance's history, in order.
SELECT seq, event_id, event_type, outcome, from_state, to_state, detail, trace_id, created_at
FROM sfworkflow.history WHERE instance_id = $1 ORDER BY id

-- timers_of_instance --
-- One instance's pending timers, the next due first.
SELECT name, due_at, payload FROM sfworkflow.timer WHERE instance_id = $1 ORDER BY due_at

-- outbox_of_instance --
-- One instance's outbox rows (published or not), in order; deferred_until/deferred_by: a rate limit's slot;
-- gate_key: the concurrency key it was queued for, `queued` while it waits for a slot (with how many of the key's
-- commands are ahead of it), granted_at once it got one.
SELECT o.id, o.message_id, o.kind, o.routing_key, o.created_at, o.published_at, o.publish_attempts, o.last_error,
       o.failed_at, o.deferred_until, o.deferred_by, o.gate_key, o.granted_at,
       COALESCE(o.next_attempt_at = 'infinity' AND o.published_at IS NULL AND o.failed_at IS NULL, false) AS queued,
       CASE WHEN o.gate_key IS NOT NULL AND o.next_attempt_at = 'infinity' AND o.published_at IS NULL
                 AND o.failed_at IS NULL
            THEN (SELECT count(*) FROM sfworkflow.outbox g
                  WHERE g.gate_key = o.gate_key AND g.next_attempt_at = 'infinity' AND g.published_at IS NULL
                    AND g.failed_at IS NULL AND g.id < o.id) END AS queued_ahead,
       o.body
FROM sfworkflow.outbox o WHERE o.instance_id = $1 ORDER BY o.id

-- list_instances_page --
-- One page of instances in id order after $5 ($6 rows at most); the filters are NULL when not given.
SELECT id, tenant_id, workflow, entity_id, definition_version, state, version, terminal, parked_count,
       last_event_type, created_at, updated_at, state_entered_at
FROM sfworkflow.instance
WHERE ($1::text IS NULL OR workflow = $1)
  AND ($2::uuid IS NULL OR tenant_id = $2)
  AND ($3::text IS NULL OR state = $3)
  AND ($4::boolean IS NULL OR terminal = $4)
  AND id > $5
ORDER BY id
LIMIT $6

-- list_parked --
-- Parked events, the nearest deadline first, with the time left by the database's clock and the total matching;
-- the filters are NULL when not given.
SELECT tenant_id, workflow, entity_id, event_type, event_id, reason, parked_at, deadline, awaiting_version,
       deadline - now() AS time_left, count(*) OVER () AS total
FROM sfworkflow.parked
WHERE ($1::text IS NULL OR workflow = $1) AND ($2::uuid IS NULL OR tenant_id = $2::uuid)
ORDER BY deadline, id
LIMIT $3

-- inbox_state_of_event --
-- Whether an event ($2 of tenant $1, of workflow $3 and entity $4) is in the inbox, and whether it was taken (the
-- history of its instance, or a parked row, names it). History has no index on event_id
-- (migration 0010): the instance is found by its key, its history by history_instance_idx.
SELECT EXISTS (SELECT 1 FROM sfworkflow.inbox WHERE tenant_id = $1 AND event_id = $2) AS in_inbox,
       EXISTS (SELECT 1 FROM sfworkflow.instance i JOIN sfworkflow.history h ON h.instance_id = i.id
               WHERE i.tenant_id = $1 AND i.workflow = $3 AND i.entity_id = $4 AND h.event_id = $2)
       OR EXISTS (SELECT 1 FROM sfworkflow.parked WHERE tenant_id = $1 AND event_id = $2) AS taken

-- release_inbox_entry --
-- Forget that an event was received, so that its redrive is not dropped as a duplicate.
DELETE FROM sfworkflow.inbox WHERE tenant_id = $1 AND event_id = $2

-- instances_by_state_and_end --
-- Instances per workflow, state and whether they ended (the status page).
SELECT workflow, state, terminal, count(*) AS n FROM sfworkflow.instance GROUP BY workflow, state, terminal
ORDER BY workflow, terminal, state

-- dead_letters_by_reason --
-- Dead-letter outbox rows of the last $1 seconds per reason code, with the newest one's time.
SELECT COALESCE(headers->>'x-sfworkflow-reason', 'unknown') AS reason, count(*) AS n, max(created_at) AS last
FROM sfworkflow.outbox
WHERE kind = 'dead_letter' AND created_at > now() - make_interval(secs => $1)
GROUP BY 1 ORDER BY n DESC, reason

-- outbox_backlog_by_kind --
-- Unpublished messages per kind: those due (n) and the age in seconds of the oldest of them, counted from when it
-- was due, and those a rate limit deferred to a time still ahead (deferred: not late). Commands queued for a
-- concurrency slot are not counted (slots_by_limit counts them).
SELECT kind, count(*) FILTER (WHERE NOT ahead) AS n,
       COALESCE(EXTRACT(EPOCH FROM now() - min(due) FILTER (WHERE NOT ahead)), 0)::float8 AS oldest_s,
       count(*) FILTER (WHERE ahead) AS deferred
FROM (SELECT kind, greatest(created_at, deferred_until, granted_at) AS due,
             COALESCE(deferred_until > now(), false) AS ahead
      FROM sfworkflow.outbox WHERE published_at IS NULL AND failed_at IS NULL AND next_attempt_at <> 'infinity') o
GROUP BY kind ORDER BY kind

-- demo_settled_count --
-- The demo: how many of a tenant's instances have settled (terminal, or waiting for an operator: $2/$3).
SELECT count(*) FROM sfworkflow.instance
WHERE tenant_id = $1 AND (terminal OR (workflow, state) IN (SELECT * FROM unnest($2::text[], $3::text[])))

-- demo_unsettled --
-- The demo: a tenant's first 20 instances that have not settled ($2/$3: the operator states), oldest change first.
SELECT workflow, entity_id, state, updated_at FROM sfworkflow.instance
WHERE tenant_id = $1 AND NOT (terminal OR (workflow, state) IN (SELECT * FROM unnest($2::text[], $3::text[])))
ORDER BY updated_at LIMIT 20

-- demo_unpublished_count --
-- The demo: outbox rows not published yet (every tenant).
SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL

-- demo_states --
-- The demo: a tenant's instances per workflow and state, the most frequent state first.
SELECT workflow, state, count(*) AS n FROM sfworkflow.instance WHERE tenant_id = $1
GROUP BY workflow, state ORDER BY workflow, n DESC

-- demo_commands_over_attempts --
-- The demo: (idempotency key, attempt) pairs of a tenant that carry more than one command (should be none).
SELECT count(*) FROM (
    SELECT convert_from(o.body, 'UTF8')::jsonb->>'idempotency_key' AS k,
           convert_from(o.body, 'UTF8')::jsonb->>'attempt' AS a
    FROM sfworkflow.outbox o JOIN sfworkflow.instance i ON i.id = o.instance_id
    WHERE i.tenant_id = $1 AND o.kind = 'command'
    GROUP BY 1, 2 HAVING count(*) > 1) d

-- demo_command_retries --
-- The demo: a tenant's commands that are retries (attempt above 1).
SELECT count(*) FROM sfworkflow.outbox o JOIN sfworkflow.instance i ON i.id = o.instance_id
WHERE i.tenant_id = $1 AND o.kind = 'command'
  AND (convert_from(o.body, 'UTF8')::jsonb->>'attempt')::int > 1

-- demo_outbox_by_kind --
-- The demo: a tenant's outbox rows per kind.
SELECT o.kind, count(*) AS n FROM sfworkflow.outbox o JOIN sfworkflow.instance i
ON i.id = o.instance_id WHERE i.tenant_id = $1 GROUP BY o.kind

-- limit_overrides --
-- The tenants' limit overrides ($1: one tenant's, or NULL for every tenant's): a rate and/or a daily cap, or slots.
SELECT tenant_id, limit_name, per_s, burst, daily_cap, slots, reason, updated_by, updated_at
FROM sfworkflow.limit_override
WHERE ($1::uuid IS NULL OR tenant_id = $1::uuid)
ORDER BY tenant_id, limit_name

-- upsert_limit_override --
-- Set a tenant's rate ($3, $4) and/or daily cap ($8), or slots ($7), for a limit; the stored row. A rate limit's
-- override keeps what this one does not name of the tenant's earlier one (a cap set keeps its own rate, and the other
-- way round); slots replace.
INSERT INTO sfworkflow.limit_override AS o (tenant_id, limit_name, per_s, burst, reason, updated_by, slots, daily_cap)
VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (tenant_id, limit_name) DO UPDATE SET
    per_s = CASE WHEN EXCLUDED.slots IS NULL AND EXCLUDED.per_s IS NULL THEN o.per_s ELSE EXCLUDED.per_s END,
    burst = CASE WHEN EXCLUDED.slots IS NULL AND EXCLUDED.per_s IS NULL THEN o.burst ELSE EXCLUDED.burst END,
    daily_cap = CASE WHEN EXCLUDED.slots IS NULL AND EXCLUDED.daily_cap IS NULL THEN o.daily_cap
                     ELSE EXCLUDED.daily_cap END,
    slots = EXCLUDED.slots, reason = EXCLUDED.reason, updated_by = EXCLUDED.updated_by, updated_at = now()
RETURNING tenant_id, limit_name, per_s, burst, daily_cap, slots, reason, updated_by, updated_at

-- delete_limit_override --
-- Remove a tenant's override of a limit; the removed row (none when it had no override).
DELETE FROM sfworkflow.limit_override WHERE tenant_id = $1::uuid AND limit_name = $2
RETURNING tenant_id, limit_name, per_s, burst, daily_cap, slots, reason, updated_by, updated_at

-- slots_of_tenant --
-- A tenant's concurrency slots held and commands queued for one, per limit.
SELECT limit_name, sum(held)::bigint AS held, sum(waiting)::bigint AS waiting
FROM (SELECT limit_name, count(*) AS held, 0 AS waiting FROM sfworkflow.slot WHERE tenant_id = $1::uuid GROUP BY 1
      UNION ALL
      SELECT split_part(o.gate_key, '|', 1), 0, count(*) FROM sfworkflow.outbox o
      WHERE o.gate_key LIKE '%|' || $1::text || '|%' AND o.next_attempt_at = 'infinity'
        AND o.published_at IS NULL AND o.failed_at IS NULL
      GROUP BY 1) x
GROUP BY limit_name

-- rate_buckets_of_tenant --
-- A tenant's rate-limit buckets, the most booked first: with a daily cap, the UTC day of the latest slot and how many
-- slots that day holds.
SELECT bucket_key, limit_name, tat, cap_day, cap_used FROM sfworkflow.rate_bucket WHERE tenant_id = $1::uuid ORDER BY tat DESC LIMIT 100

-- deferred_of_tenant --
-- Per limit, a tenant's unpublished commands deferred to a time still ahead: how many, and the last slot.
SELECT o.deferred_by, count(*) AS n, max(o.deferred_until) AS last
FROM sfworkflow.outbox o JOIN sfworkflow.instance i ON i.id = o.instance_id
WHERE o.published_at IS NULL AND o.failed_at IS NULL AND o.deferred_until > now() AND i.tenant_id = $1::uuid
GROUP BY o.deferred_by

-- compat_instances --
-- Instances of a workflow whose histories to replay ($1): in flight only unless $2, updated since $3 when given,
-- at most $4 (NULL: all), a random sample when $5, else the newest first.
SELECT id, tenant_id, workflow, entity_id, definition_version, state, terminal
FROM sfworkflow.instance
WHERE workflow = $1 AND ($2::boolean OR NOT terminal) AND ($3::timestamptz IS NULL OR updated_at >= $3)
ORDER BY CASE WHEN $5::boolean THEN random() END, id DESC
LIMIT $4

-- corpus_instances --
-- For a corpus: per workflow and state, the newest $1 instances ($2: of these workflows, NULL: all).
SELECT id, tenant_id, workflow, entity_id, definition_version, state, terminal
FROM (SELECT i.*, row_number() OVER (PARTITION BY workflow, state ORDER BY id DESC) AS n
      FROM sfworkflow.instance i WHERE $2::text[] IS NULL OR workflow = ANY($2::text[])) ranked
WHERE n <= $1
ORDER BY workflow, state, id

-- histories_with_bodies --
-- The histories of these instances, each in order, with the bodies of the external events they applied.
SELECT instance_id, seq, event_id, event_type, outcome, from_state, to_state, detail, body, created_at
FROM sfworkflow.history WHERE instance_id = ANY($1::bigint[]) ORDER BY instance_id, id

-- instances_by_ids --
-- These instances (the ones that exist), by id.
SELECT id, tenant_id, workflow, entity_id, definition_version, state, terminal
FROM sfworkflow.instance WHERE id = ANY($1::bigint[]) ORDER BY id
