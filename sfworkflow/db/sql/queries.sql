-- Every query sfworkflow runs, by name. Each block: `-- name --`, one line saying what it does, the SQL.
-- Batch statements take parallel arrays and unnest them, so a micro-batch costs a constant number
-- of round trips whatever its size.

-- insert_inbox --
-- Record events as received ($1: [{tenant_id, event_id, event_type, entity_id}], in the order to insert them);
-- returns the ones not seen before (the rest are duplicates).
INSERT INTO sfworkflow.inbox (tenant_id, event_id, event_type, entity_id)
SELECT e.tenant_id, e.event_id, e.event_type, e.entity_id
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS a(doc, n),
     jsonb_to_record(a.doc) AS e(tenant_id uuid, event_id uuid, event_type text, entity_id text)
ORDER BY a.n
ON CONFLICT DO NOTHING
RETURNING tenant_id, event_id

-- create_instances --
-- Create the instances a batch names that do not exist yet (in their initial state, version 0), in the
-- order given ($1: [{tenant_id, workflow, entity_id, definition_version, state, correlation_id}], sorted by key:
-- the first lock of a batch is taken in key order). Existing keys are skipped before the insert is tried, so
-- they take no identity value and no lock.
-- Each key is looked up on its own (LATERAL ... LIMIT 1: a probe of instance_key per key, never an anti-join that
-- hashes the table, which a plan made while the table was small did on every batch, reading every instance).
INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, correlation_id)
SELECT k.tenant_id, k.workflow, k.entity_id, k.definition_version, k.state, k.correlation_id
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS a(doc, n)
CROSS JOIN LATERAL jsonb_to_record(a.doc) AS k(tenant_id uuid, workflow text, entity_id text, definition_version int,
                                               state text, correlation_id text)
LEFT JOIN LATERAL (SELECT true AS found FROM sfworkflow.instance i
                   WHERE (i.tenant_id, i.workflow, i.entity_id) = (k.tenant_id, k.workflow, k.entity_id)
                   LIMIT 1) e ON true
WHERE e.found IS NULL
ORDER BY a.n
ON CONFLICT ON CONSTRAINT instance_key DO NOTHING

-- lock_instances --
-- Lock the instances of a batch ($1: [{tenant_id, workflow, entity_id}]) in id order (a fixed order, so
-- concurrent batches cannot deadlock). `parked_for_key`: a row created by this transaction (version 0) whose key
-- has events parked before it existed (its parked_count does not count them), so the plan reads parked events
-- only for instances that have some. Nobody can park under the key meanwhile: that needs the key's row, which
-- this transaction holds from create_instances on. Each key's id is looked up in instance_key, and each row locked by
-- its id, one probe each (LATERAL ... LIMIT 1): a join of the keys to the table was hashed by a plan made while the
-- table was small and kept by the connection, reading every instance on every batch.
WITH ids AS MATERIALIZED (
    SELECT f.id
    FROM jsonb_to_recordset($1::jsonb) AS k(tenant_id uuid, workflow text, entity_id text)
    CROSS JOIN LATERAL (SELECT x.id FROM sfworkflow.instance x
                        WHERE (x.tenant_id, x.workflow, x.entity_id) = (k.tenant_id, k.workflow, k.entity_id)
                        LIMIT 1) f
    ORDER BY f.id)
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
       i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.terminal, i.deferred_until,
       i.version = 0 AND EXISTS (SELECT 1 FROM sfworkflow.parked p
                                 WHERE (p.tenant_id, p.workflow, p.entity_id) = (i.tenant_id, i.workflow, i.entity_id))
         AS parked_for_key
FROM ids
CROSS JOIN LATERAL (SELECT * FROM sfworkflow.instance x WHERE x.id = ids.id FOR UPDATE) i  -- locked in id order
ORDER BY i.id

-- lock_instance --
-- Lock one instance by id (an operator action: replay); the columns of lock_instances.
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
       i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.terminal, i.deferred_until
FROM sfworkflow.instance i
WHERE i.id = $1
FOR UPDATE

-- instance_timer --
-- One pending timer of an instance (an operator moving it to now: replay).
SELECT instance_id, name, due_at, payload FROM sfworkflow.timer WHERE instance_id = $1 AND name = $2

-- migration_candidates --
-- Non-terminal, started instances of a workflow on a definition version, after an id, in id order.
SELECT id, tenant_id, entity_id, state FROM sfworkflow.instance
WHERE workflow = $1 AND definition_version = $2 AND NOT terminal AND version > 0 AND id > $3
ORDER BY id
LIMIT $4

-- count_migration_candidates --
-- How many instances migration_candidates yields from the start: the total of `migrate-instances`' progress.
SELECT count(*) FROM sfworkflow.instance
WHERE workflow = $1 AND definition_version = $2 AND NOT terminal AND version > 0

-- read_for_migration --
-- Instances to migrate, without a lock (a dry run); the columns of lock_instances.
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
       i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.terminal, i.deferred_until
FROM sfworkflow.instance i WHERE i.id = ANY($1::bigint[]) ORDER BY i.id

-- lock_for_migration --
-- Instances to migrate, locked; a row the service holds right now is skipped (taken by a later run).
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
       i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.terminal, i.deferred_until
FROM sfworkflow.instance i WHERE i.id = ANY($1::bigint[]) ORDER BY i.id
FOR UPDATE SKIP LOCKED

-- timer_names --
-- Names of the pending timers of some instances.
SELECT instance_id, name FROM sfworkflow.timer WHERE instance_id = ANY($1::bigint[])

-- load_parked --
-- Parked events of some instances ($1: [{tenant_id, workflow, entity_id}]), oldest first, locked so the expiry
-- sweep cannot take them too.
SELECT p.id, p.tenant_id, p.workflow, p.entity_id, p.event_id, p.body, p.headers, p.deadline, p.awaiting_version
FROM sfworkflow.parked p
JOIN jsonb_to_recordset($1::jsonb) AS k(tenant_id uuid, workflow text, entity_id text)
  USING (tenant_id, workflow, entity_id)
ORDER BY p.id
FOR UPDATE OF p

-- write_batch --
-- The rows nearly every batch writes, in one statement: one round trip instead of four, each part doing nothing
-- when it has no rows. The parts touch four different tables, so running them as sub-statements of one
-- statement changes nothing any of them sees. Rows come as JSON arrays of objects (jsonb_to_recordset): the
-- client encodes one document per kind instead of an array per column and an element at a time (5.8 against
-- 1.6 us of client CPU per history row). Returns the ids and message ids of the messages queued.
--   $1 instances: state, context, version and definition version of the instances a batch changed; the state's
--      clock restarts when the state changes or an operator acted on the instance (restart_clock); its trace is
--      set once, when it has none (its first transition);
--   $2 history: entries appended;
--   timers cancelled: every timer of some instances ($3), named timers of others ($4); one join over both
--      lists, so each is looked up in the primary key (instance_id, name), never the whole table;
--   $5 outbox, with $6 the bodies in the same order: messages queued; a message id queued before is skipped; a
--      command a rate limit deferred is due at its slot (deferred_until), not now; one a concurrency limit queued
--      (gate_key) is never due until the gate loop grants it a slot (grant_slots), nor is a message queued behind
--      one of its instance (behind_gate, or check_gate and such a row waits from an earlier batch): it falls due
--      with it, so the relay never finds it due behind a row that is not;
--   $7 capped rate-limit buckets the batch booked (take_rates locked them): their tat and daily count;
--   $8 the history entries' bodies, in the order of $2 (NULL but for an external event applied).
WITH changed AS (
    UPDATE sfworkflow.instance AS i
    SET state = u.state,
        context = u.context,
        version = u.version,
        terminal = u.terminal,
        parked_count = u.parked_count,
        definition_version = u.definition_version,
        last_event_id = COALESCE(u.last_event_id, i.last_event_id),
        last_event_type = COALESCE(u.last_event_type, i.last_event_type),
        state_entered_at = CASE WHEN i.state <> u.state OR u.restart_clock THEN now() ELSE i.state_entered_at END,
        updated_at = now(),
        trace_id = COALESCE(i.trace_id, u.trace_id),
        traceparent = CASE WHEN i.trace_id IS NULL THEN u.traceparent ELSE i.traceparent END,
        tracestate = CASE WHEN i.trace_id IS NULL THEN u.tracestate ELSE i.tracestate END,
        deferred_until = greatest(i.deferred_until, u.deferred_until)
    FROM jsonb_to_recordset($1::jsonb)
         AS u(id bigint, state text, context jsonb, version bigint, terminal bool, parked_count int,
              last_event_id uuid, last_event_type text, definition_version int, restart_clock bool, trace_id text,
              traceparent text, tracestate text, deferred_until timestamptz)
    WHERE i.id = u.id),
history AS (
    INSERT INTO sfworkflow.history (instance_id, seq, event_id, event_type, outcome, from_state, to_state, detail,
                                    trace_id, body)
    SELECT * FROM ROWS FROM (jsonb_to_recordset($2::jsonb)
                             AS (instance_id bigint, seq bigint, event_id uuid, event_type text, outcome text,
                                 from_state text, to_state text, detail jsonb, trace_id text),
                             unnest($8::bytea[]))),
cancelled AS (
    DELETE FROM sfworkflow.timer t
    USING (SELECT unnest($3::bigint[]), NULL::text
           UNION ALL
           SELECT * FROM jsonb_to_recordset($4::jsonb) AS n(instance_id bigint, name text)) AS c(instance_id, name)
    WHERE t.instance_id = c.instance_id AND (c.name IS NULL OR t.name = c.name)),
queued AS (
    INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body, headers, mandatory,
                                   next_attempt_at, deferred_until, deferred_by, gate_key, gate_timers)
    SELECT o.message_id, o.kind, o.exchange, o.routing_key, o.instance_id, o.body, o.headers, o.mandatory,
           CASE WHEN o.gate_key IS NOT NULL OR o.behind_gate THEN 'infinity'
                WHEN o.check_gate AND EXISTS (
                    SELECT 1 FROM sfworkflow.outbox g
                    WHERE g.instance_id = o.instance_id AND g.published_at IS NULL AND g.failed_at IS NULL
                      AND g.next_attempt_at = 'infinity') THEN 'infinity'
                ELSE COALESCE(o.deferred_until, now()) END,
           o.deferred_until, o.deferred_by, o.gate_key, o.gate_timers
    FROM ROWS FROM (jsonb_to_recordset($5::jsonb)
                        AS (message_id uuid, kind text, exchange text, routing_key text, instance_id bigint,
                            headers jsonb, mandatory bool, deferred_until timestamptz, deferred_by text,
                            gate_key text, gate_timers jsonb, behind_gate bool, check_gate bool),
                    unnest($6::bytea[]))
         AS o(message_id, kind, exchange, routing_key, instance_id, headers, mandatory, deferred_until, deferred_by,
              gate_key, gate_timers, behind_gate, check_gate, body)
    ON CONFLICT ON CONSTRAINT outbox_message DO NOTHING
    RETURNING id, message_id),
booked AS (
    UPDATE sfworkflow.rate_bucket b SET tat = c.tat, cap_day = c.cap_day, cap_used = c.cap_used,
        cap_pushed = c.cap_pushed
    FROM jsonb_to_recordset($7::jsonb)
         AS c(bucket_key text, tat timestamptz, cap_day date, cap_used int, cap_pushed bool)
    WHERE b.bucket_key = c.bucket_key)
SELECT id, message_id FROM queued

-- delete_unstarted --
-- Remove instances created for a start event that could not be applied (still at version 0).
DELETE FROM sfworkflow.instance WHERE id = ANY($1::bigint[]) AND version = 0

-- release_slots --
-- Concurrency slots the batch's instances no longer hold ($1: [{instance_id, state, terminal, reissued}] as the
-- batch leaves them): those held in states the instance left, every one when it ended, and those of the limits it
-- issued a new command under (the new one waits for a slot of its own). Returns their keys.
DELETE FROM sfworkflow.slot s
USING jsonb_to_recordset($1::jsonb) AS r(instance_id bigint, state text, terminal bool, reissued text[])
WHERE s.instance_id = r.instance_id AND (r.terminal OR r.state <> ALL (s.held_in) OR s.limit_name = ANY (r.reissued))
RETURNING s.gate_key

-- waiting_gates --
-- Concurrency keys with commands queued for a slot (through outbox_gated_idx), after key $2, in key order, at
-- most $1 (the gate loop goes round them all, $1 a round).
SELECT DISTINCT gate_key FROM sfworkflow.outbox
WHERE gate_key IS NOT NULL AND next_attempt_at = 'infinity' AND published_at IS NULL AND failed_at IS NULL
  AND gate_key > $2
ORDER BY gate_key
LIMIT $1

-- ensure_gate --
-- The row whose lock serialises a concurrency key's grants ($1 key, $2 tenant, $3 limit name).
INSERT INTO sfworkflow.slot_gate (gate_key, tenant_id, limit_name) VALUES ($1, $2, $3)
ON CONFLICT (gate_key) DO NOTHING

-- lock_gate --
-- Lock a concurrency key for its grants, unless another replica is granting it now (it is skipped this round).
SELECT gate_key FROM sfworkflow.slot_gate WHERE gate_key = $1 FOR UPDATE SKIP LOCKED

-- grant_slots --
-- Under the key's lock (lock_gate; counted in a statement of its own, so it sees every grant committed before the
-- lock): give the free slots of key $1 (the tenant's own `slots`, else $2) to its oldest queued commands whose
-- instance is still in the limit's states $3 (locked FOR SHARE: no batch moves it meanwhile): a slot row each, the
-- outbox row due now (or at its rate limit's slot) with the instance's messages queued behind it up to its next
-- queued command, the timers its step set to start now. A queued command whose instance left $3 or ended before a
-- slot was free is withdrawn: never published silently (failed_at, last_error says why; `outbox republish --id`
-- sends it anyway), and the messages behind it fall due. Looks at up to 50 rows past the free slots, so withdrawn
-- ones do not hold the key's grants back for long; none when no slot is free. $4 tenant, $5 limit name. Returns
-- the outbox ids granted.
WITH cap AS (
    SELECT COALESCE((SELECT o.slots FROM sfworkflow.limit_override o
                     WHERE o.tenant_id = $4 AND o.limit_name = $5 AND o.slots IS NOT NULL), $2)
           - (SELECT count(*) FROM sfworkflow.slot WHERE gate_key = $1) AS free),
queued AS (
    SELECT o.id, o.message_id, o.instance_id, o.gate_timers, NOT i.terminal AND i.state = ANY ($3::text[]) AS live
    FROM sfworkflow.outbox o JOIN sfworkflow.instance i ON i.id = o.instance_id
    WHERE o.gate_key = $1 AND o.next_attempt_at = 'infinity' AND o.published_at IS NULL AND o.failed_at IS NULL
    ORDER BY o.id
    LIMIT CASE WHEN (SELECT free FROM cap) > 0 THEN (SELECT free FROM cap) + 50 ELSE 0 END
    FOR UPDATE OF o FOR SHARE OF i),
chosen AS (
    SELECT * FROM queued WHERE live ORDER BY id LIMIT greatest(0, (SELECT free FROM cap))),
withdrawn AS (
    UPDATE sfworkflow.outbox o
    SET failed_at = now(),
        last_error = 'withdrawn: the instance left ' || array_to_string($3::text[], '/') || ' before a slot of '
                     || $5 || ' was free; `sfworkflow outbox republish --id` sends it anyway'
    FROM queued q WHERE o.id = q.id AND NOT q.live
    RETURNING o.id, o.instance_id),
opened AS (  -- the granted or withdrawn rows, and each instance's next queued command after them (the end of what
             -- falls due with them)
    SELECT x.id, x.instance_id,
           (SELECT min(n.id) FROM sfworkflow.outbox n
            WHERE n.instance_id = x.instance_id AND n.id > x.id AND n.gate_key IS NOT NULL
              AND n.next_attempt_at = 'infinity' AND n.published_at IS NULL AND n.failed_at IS NULL) AS next_gate
    FROM (SELECT id, instance_id FROM chosen UNION ALL SELECT id, instance_id FROM withdrawn) x),
granted AS (
    UPDATE sfworkflow.outbox o
    SET next_attempt_at = greatest(now(), o.deferred_until),
        granted_at = CASE WHEN o.id IN (SELECT id FROM chosen) THEN now() END
    FROM opened p
    WHERE o.instance_id = p.instance_id AND o.published_at IS NULL AND o.failed_at IS NULL
      AND o.next_attempt_at = 'infinity'
      AND (o.id = p.id AND o.id IN (SELECT id FROM chosen)
           OR o.id > p.id AND o.gate_key IS NULL AND (p.next_gate IS NULL OR o.id < p.next_gate))
    RETURNING o.id),
held AS (
    INSERT INTO sfworkflow.slot (command_id, gate_key, limit_name, tenant_id, instance_id, held_in)
    SELECT c.message_id, $1, $5, $4, c.instance_id, $3::text[] FROM chosen c
    ON CONFLICT (command_id) DO NOTHING),
started AS (
    INSERT INTO sfworkflow.timer (instance_id, name, due_at, payload, lane)
    SELECT c.instance_id, t.name, now() + make_interval(secs => t.delay_s), t.payload, sfworkflow.tenant_lane($4)
    FROM chosen c
    CROSS JOIN LATERAL jsonb_to_recordset(COALESCE(c.gate_timers, '[]'::jsonb)) AS t(name text, delay_s float8,
                                                                                     payload jsonb)
    ON CONFLICT (instance_id, name) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload,
        created_at = now())
SELECT id FROM chosen

-- sweep_slots --
-- Slots nobody holds any more: their instance ended, left the states that hold them, or is gone (an operator's
-- action, retention). A batch releases its own (release_slots); this catches the rest. Returns their keys.
DELETE FROM sfworkflow.slot s
WHERE NOT EXISTS (SELECT 1 FROM sfworkflow.instance i
                  WHERE i.id = s.instance_id AND NOT i.terminal AND i.state = ANY (s.held_in))
RETURNING s.gate_key

-- slots_by_limit --
-- Concurrency slots held, and commands queued for one, per limit (the cluster gauges).
SELECT limit_name, sum(held)::bigint AS held, sum(waiting)::bigint AS waiting
FROM (SELECT limit_name, count(*) AS held, 0 AS waiting FROM sfworkflow.slot GROUP BY 1
      UNION ALL
      SELECT split_part(gate_key, '|', 1), 0, count(*) FROM sfworkflow.outbox
      WHERE gate_key IS NOT NULL AND next_attempt_at = 'infinity' AND published_at IS NULL AND failed_at IS NULL
      GROUP BY 1) x
GROUP BY limit_name ORDER BY limit_name

-- upsert_timers --
-- Schedule or move timers, each in its tenant's lane (migration 0012).
INSERT INTO sfworkflow.timer (instance_id, name, due_at, payload, lane)
SELECT t.*, sfworkflow.tenant_lane(i.tenant_id)
FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::jsonb[]) AS t(instance_id, name, due_at, payload)
JOIN sfworkflow.instance i ON i.id = t.instance_id
ON CONFLICT (instance_id, name) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload,
    created_at = now()

-- insert_effects --
-- Claim effect keys ($1: [{effect_key, tenant_id, instance_id, command_id, idempotency_key}], in key order);
-- returns the keys claimed now (the others were claimed before: suppressed).
INSERT INTO sfworkflow.effect (effect_key, tenant_id, instance_id, command_id, idempotency_key)
SELECT c.effect_key, c.tenant_id, c.instance_id, c.command_id, c.idempotency_key
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS a(doc, n),
     jsonb_to_record(a.doc) AS c(effect_key text, tenant_id uuid, instance_id bigint, command_id uuid,
                                 idempotency_key text)
ORDER BY a.n
ON CONFLICT (effect_key) DO NOTHING
RETURNING effect_key

-- insert_parked --
-- Park events that are not allowed yet, or that wait for a replica with their instance's definition version.
INSERT INTO sfworkflow.parked (tenant_id, workflow, entity_id, event_id, event_type, body, headers, reason, deadline,
                               awaiting_version)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::bytea[], $7::jsonb[],
                     $8::text[], $9::timestamptz[], $10::int[])
ON CONFLICT ON CONSTRAINT parked_event DO NOTHING

-- raise_parked_counts --
-- Instances on a definition version this replica has not loaded: count the events parked for them.
UPDATE sfworkflow.instance AS i SET parked_count = i.parked_count + u.n
FROM unnest($1::bigint[], $2::int[]) AS u(id, n)
WHERE i.id = u.id

-- clear_awaiting_version --
-- Parked events a replica with their definition version has tried: from now on they wait for a transition.
UPDATE sfworkflow.parked SET awaiting_version = NULL WHERE id = ANY($1::bigint[])

-- instances_awaiting_version --
-- Instances on one of the given (workflow, definition version) pairs with events parked for that version.
SELECT DISTINCT i.tenant_id, i.workflow, i.entity_id
FROM sfworkflow.parked p
JOIN sfworkflow.instance i USING (tenant_id, workflow, entity_id)
WHERE p.awaiting_version IS NOT NULL
  AND (p.workflow, p.awaiting_version) IN (SELECT * FROM unnest($1::text[], $2::int[]))
  AND i.definition_version = p.awaiting_version
LIMIT $3

-- delete_parked --
-- Remove parked events that were applied or ignored.
DELETE FROM sfworkflow.parked WHERE id = ANY($1::bigint[])

-- notify_relays --
-- Wake the relays of every replica (LISTEN sfworkflow_outbox): for rows queued by a process without a relay
-- of its own (an operator's command). The service's own batches wake their relay in-process instead: a
-- NOTIFYing commit takes a cluster-wide lock through its WAL flush, so every replica's commits would queue.
SELECT pg_notify('sfworkflow_outbox', '')

-- lock_due_timer_instances_by_lane --
-- A round's fair share (migration 0012): per timer lane, up to $1 due timers oldest first of unlocked instances
-- on the (workflow, version) pairs $2/$3, through timer_lane_due_idx; one row per timer, with its lane.
SELECT l.lane, x.*
FROM generate_series(0, 63) AS l(lane) CROSS JOIN LATERAL (
    SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
           i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.deferred_until
    FROM sfworkflow.timer t JOIN sfworkflow.instance i ON i.id = t.instance_id
    WHERE t.lane = l.lane AND t.due_at <= now()
      AND (i.workflow, i.definition_version) IN (SELECT * FROM unnest($2::text[], $3::int[]))
    ORDER BY t.due_at
    LIMIT $1
    FOR UPDATE OF i SKIP LOCKED
) x

-- lock_due_timer_instances --
-- The rest of a round (after lock_due_timer_instances_by_lane, whose instances are $4): instances with a due
-- timer that no other process holds, on the given (workflow, definition version) pairs, oldest due first whatever
-- their lane: one row per due timer, at most $1. The limit counts rows after the locked ones are skipped, so
-- replicas firing at once take different timers instead of all choosing the same oldest ones. Nothing here
-- waits: an instance another transaction holds is skipped.
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
       i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.deferred_until
FROM sfworkflow.timer t JOIN sfworkflow.instance i ON i.id = t.instance_id
WHERE t.due_at <= now() AND t.lane < 64  -- every lane: the predicate of timer_due_idx (migration 0012)
  AND (i.workflow, i.definition_version) IN (SELECT * FROM unnest($2::text[], $3::int[]))
  AND i.id <> ALL($4::bigint[])
ORDER BY t.due_at
LIMIT $1
FOR UPDATE OF i SKIP LOCKED

-- lock_timer_instance --
-- One instance with due timers, unless another process holds it.
SELECT i.id, i.tenant_id, i.workflow, i.entity_id, i.definition_version, i.state, i.context,
       i.version, i.parked_count, i.correlation_id, i.trace_id, i.traceparent, i.tracestate, i.deferred_until
FROM sfworkflow.instance i
WHERE i.id = $1 AND EXISTS (SELECT 1 FROM sfworkflow.timer t WHERE t.instance_id = i.id AND t.due_at <= now())
FOR UPDATE OF i SKIP LOCKED

-- put_back_due_timers --
-- Move an instance's due timers $2 seconds later after they could not be fired, with a `failed` history
-- row; how many were moved.
WITH moved AS (
    UPDATE sfworkflow.timer SET due_at = now() + make_interval(secs => $2)
    WHERE instance_id = $1 AND due_at <= now()
    RETURNING name
), h AS (
    INSERT INTO sfworkflow.history (instance_id, seq, event_id, event_type, outcome, from_state, to_state, detail)
    SELECT i.id, i.version, NULL, i.workflow || '.timer.' || m.name, 'failed', i.state, i.state,
           jsonb_build_object('error', $3::text, 'timer', m.name, 'retry_at', now() + make_interval(secs => $2))
    FROM sfworkflow.instance i, moved m WHERE i.id = $1
)
SELECT count(*) FROM moved

-- count_unfireable_due_timers --
-- Due timers of instances on (workflow, definition version) pairs other than the given ones.
SELECT count(*) FROM sfworkflow.timer t JOIN sfworkflow.instance i ON i.id = t.instance_id
WHERE t.due_at <= now() AND t.lane < 64  -- every lane: the predicate of timer_due_idx
  AND (i.workflow, i.definition_version) NOT IN (SELECT * FROM unnest($1::text[], $2::int[]))

-- take_due_timers --
-- Remove and return the due timers of instances this process has locked.
DELETE FROM sfworkflow.timer
WHERE instance_id = ANY($1::bigint[]) AND due_at <= now()
RETURNING instance_id, name, due_at, payload

-- take_expired_parked --
-- Remove parked events past their deadline (skipping rows another transaction holds).
DELETE FROM sfworkflow.parked
WHERE id IN (SELECT id FROM sfworkflow.parked WHERE deadline <= now() ORDER BY deadline LIMIT $1
             FOR UPDATE SKIP LOCKED)
RETURNING id, tenant_id, workflow, entity_id, event_id, event_type, body, headers, reason, parked_at, deadline,
          awaiting_version

-- take_rates --
-- Reserve slots in rate-limit buckets (core/limits.py; $1: [{bucket_key, tenant_id, limit_name, n, per_s, burst,
-- daily_cap}], in key order, the lock order), at the tenant's override of the rate (and of the daily cap) when it
-- has one: each bucket's theoretical arrival time moves on by n intervals from itself or from now, whichever is later
-- (a new bucket starts at now). Returns each bucket's new tat, the rate it was taken at, its daily count, and the
-- transaction's clock. The bucket rows stay locked until commit: batches sharing a key take their slots one after
-- the other. A capped bucket's slots are booked by the plan from this answer (core/limits.py reserve), and the
-- batch's write_batch writes its tat and count.
WITH r AS (
    SELECT r.bucket_key, r.tenant_id, r.limit_name, r.n, COALESCE(o.per_s, r.per_s) AS per_s,
           COALESCE(o.burst, r.burst) AS burst, COALESCE(o.daily_cap, r.daily_cap) AS daily_cap
    FROM jsonb_to_recordset($1::jsonb)
         AS r(bucket_key text, tenant_id uuid, limit_name text, n int, per_s float8, burst int, daily_cap int)
    LEFT JOIN sfworkflow.limit_override o ON o.tenant_id = r.tenant_id AND o.limit_name = r.limit_name),
taken AS (
    INSERT INTO sfworkflow.rate_bucket AS b (bucket_key, tenant_id, limit_name, tat)
    SELECT bucket_key, tenant_id, limit_name, now() + make_interval(secs => n / per_s) FROM r ORDER BY bucket_key
    ON CONFLICT (bucket_key) DO UPDATE SET tat = greatest(b.tat, now()) + (EXCLUDED.tat - now()), updated_at = now()
    RETURNING bucket_key, tat, cap_day, cap_used, cap_pushed)
SELECT t.bucket_key, t.tat, t.cap_day, t.cap_used, t.cap_pushed, r.per_s, r.burst, r.daily_cap,
       now() AS now
FROM taken t JOIN r USING (bucket_key)

-- claim_outbox --
-- Unpublished messages due for a publish attempt, skipping rows another relay holds and rows behind an earlier
-- unpublished row of their instance: one backing off (inside, so they take no place in the limit) or one not
-- claimed here (held by another relay, or past the limit). An instance's rows come out in id order; the relay
-- publishes them one after the other. Rows given up (failed_at) hold nothing back.
-- The candidates are at most 2 x $1 due rows, taken in whatever order the plan reads them (oldest due first
-- among them): a claim reads about what it claims, whatever the backlog. The planner's estimate of unpublished
-- rows dates from the last ANALYZE, taken while the relay kept up; with the sort over every due row before the
-- limit, a backlog (an outage, a burst) was read whole on every round: 20,400 rows for 500, 50-190 ms a claim.
WITH candidates AS MATERIALIZED (
    SELECT c.id FROM sfworkflow.outbox c
    WHERE c.published_at IS NULL AND c.failed_at IS NULL AND c.next_attempt_at <= now()
    LIMIT $1 * 2),
due AS (
    SELECT d.id, d.message_id, d.kind, d.exchange, d.routing_key, d.body, d.headers, d.mandatory,
           d.publish_attempts, d.instance_id
    FROM sfworkflow.outbox d
    WHERE d.id IN (SELECT id FROM candidates)
      AND d.published_at IS NULL AND d.failed_at IS NULL AND d.next_attempt_at <= now()
      AND (d.instance_id IS NULL OR NOT EXISTS (
          SELECT 1 FROM sfworkflow.outbox e
          WHERE e.instance_id = d.instance_id AND e.id < d.id AND e.published_at IS NULL AND e.failed_at IS NULL
            AND e.next_attempt_at > now()))
    ORDER BY d.next_attempt_at, d.id
    LIMIT $1
    FOR UPDATE OF d SKIP LOCKED)
SELECT * FROM due
WHERE instance_id IS NULL OR NOT EXISTS (
    SELECT 1 FROM sfworkflow.outbox e
    WHERE e.instance_id = due.instance_id AND e.id < due.id AND e.published_at IS NULL AND e.failed_at IS NULL
      AND e.id NOT IN (SELECT id FROM due))
ORDER BY id

-- claim_handed --
-- Rows this process just committed and handed to its relay in memory (their ids), locked for publishing:
-- those another relay holds are skipped, and so is a row not due yet (a rate limit deferred it) or behind an
-- earlier unpublished row of its instance that is not locked here (held by another relay, backing off,
-- deferred); the polling claim takes those later.
WITH mine AS (
    SELECT o.id, o.instance_id, o.publish_attempts
    FROM unnest($1::bigint[]) AS h(id)
    -- each row found by its id in the primary key (LATERAL: a probe per id), and "unpublished" and "due" tested on
    -- the row found, never index conditions: outbox_due_idx and outbox_unpublished_instance_idx keep an entry for
    -- every row waiting and every row published since the last vacuum, and plans that scanned either beside the
    -- ids (a bitmap scan; a plan made while the outbox was small, kept by the connection) read them all on every claim
    CROSS JOIN LATERAL (SELECT x.id, x.instance_id, x.publish_attempts FROM sfworkflow.outbox x
                        WHERE x.id = h.id AND (x.published_at IS NULL) IS TRUE AND x.failed_at IS NULL
                          AND (x.next_attempt_at <= now()) IS TRUE
                        FOR UPDATE SKIP LOCKED) o)
SELECT id, publish_attempts FROM mine
WHERE instance_id IS NULL OR NOT EXISTS (
    SELECT 1 FROM sfworkflow.outbox e
    WHERE e.instance_id = mine.instance_id AND e.id < mine.id AND e.published_at IS NULL AND e.failed_at IS NULL
      AND e.id NOT IN (SELECT id FROM mine))

-- mark_published --
-- Mark messages the broker confirmed.
UPDATE sfworkflow.outbox SET published_at = now(), publish_attempts = publish_attempts + 1, last_error = NULL
WHERE id = ANY($1::bigint[])

-- mark_publish_failed --
-- Record a failed publish attempt and when to try again; a row whose $4 is true is given up (failed_at set).
UPDATE sfworkflow.outbox AS o
SET publish_attempts = o.publish_attempts + 1,
    last_error = f.error,
    next_attempt_at = now() + make_interval(secs => f.delay_s),
    failed_at = CASE WHEN f.give_up THEN now() END
FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::boolean[]) AS f(id, error, delay_s, give_up)
WHERE o.id = f.id

-- outbox_backlog --
-- Unpublished messages the relay still tries, and the age in seconds of the oldest, counted from when it was due
-- (rows given up not counted); commands a rate limit deferred to a time still ahead are not late but `deferred`,
-- with the seconds until the last of them falls due. Commands queued for a concurrency slot are not counted
-- (slots_by_limit counts them); a granted one is late from its grant.
SELECT count(*) FILTER (WHERE NOT ahead) AS backlog,
       COALESCE(EXTRACT(EPOCH FROM now() - min(due) FILTER (WHERE NOT ahead)), 0)::float8 AS oldest_s,
       count(*) FILTER (WHERE ahead) AS deferred,
       COALESCE(EXTRACT(EPOCH FROM max(due) FILTER (WHERE ahead) - now()), 0)::float8 AS deferred_until_s
FROM (SELECT greatest(created_at, deferred_until, granted_at) AS due,
             COALESCE(deferred_until > now(), false) AS ahead
      FROM sfworkflow.outbox WHERE published_at IS NULL AND failed_at IS NULL AND next_attempt_at <> 'infinity') o

-- outbox_failed_count --
-- Rows the relay gave up, waiting for an operator's republish (not the commands a gate withdrew: their instance
-- moved on, nothing waits for them).
SELECT count(*) FROM sfworkflow.outbox
WHERE failed_at IS NOT NULL AND published_at IS NULL AND NOT (gate_key IS NOT NULL AND granted_at IS NULL)

-- outbox_failed --
-- Rows the relay gave up, oldest first ($1: a kind or NULL), at most $2.
SELECT id, message_id, kind, exchange, routing_key, instance_id, publish_attempts, last_error, created_at, failed_at
FROM sfworkflow.outbox
WHERE failed_at IS NOT NULL AND published_at IS NULL AND ($1::text IS NULL OR kind = $1)
ORDER BY id
LIMIT $2

-- republish_failed --
-- Make given-up rows due again ($1: their ids, or NULL for all but the commands a gate withdrew, which only their
-- id sends: their instance moved on; $2: a kind or NULL); how many.
WITH again AS (
    UPDATE sfworkflow.outbox
    SET failed_at = NULL, publish_attempts = 0, next_attempt_at = now()
    WHERE failed_at IS NOT NULL AND published_at IS NULL
      AND ($1::bigint[] IS NULL AND NOT (gate_key IS NOT NULL AND granted_at IS NULL) OR id = ANY($1))
      AND ($2::text IS NULL OR kind = $2)
    RETURNING id)
SELECT count(*) FROM again

-- active_instances_by_state --
-- Active (not ended) instances per workflow and state, read through the partial index instance_active_idx:
-- ended instances, which pile up until retention removes them, are not read.
SELECT workflow, state, count(*) AS n FROM sfworkflow.instance WHERE NOT terminal GROUP BY workflow, state

-- try_lead_cluster_stats --
-- Take the session advisory lock of the replica that exports the cluster gauges (runtime/stats.py); true when
-- taken. Held until the session ends.
SELECT pg_try_advisory_lock(1937207154)

-- parked_count --
-- Events waiting in the parked table.
SELECT count(*) FROM sfworkflow.parked

-- parked_nearest_deadline --
-- Seconds until the nearest deadline of a parked event (negative once past it; NULL when nothing is parked).
-- min() reads one end of parked_deadline_idx.
SELECT EXTRACT(EPOCH FROM min(deadline) - now())::float8 FROM sfworkflow.parked

-- insert_claims --
-- Hold claim keys; returns the keys taken now (the others are held already, by someone).
INSERT INTO sfworkflow.claim (claim_key, tenant_id, workflow, entity_id, instance_id)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::bigint[])
ON CONFLICT (claim_key) DO NOTHING
RETURNING claim_key

-- claim_holders --
-- Who holds these claim keys.
SELECT claim_key, instance_id, workflow, entity_id FROM sfworkflow.claim WHERE claim_key = ANY($1::text[])

-- delete_claims --
-- Give up claim keys (only those held by the instance giving them up).
DELETE FROM sfworkflow.claim c
USING unnest($1::text[], $2::bigint[]) AS r(claim_key, instance_id)
WHERE c.claim_key = r.claim_key AND c.instance_id = r.instance_id

-- read_registers --
-- Current values of registers.
SELECT key, value FROM sfworkflow.register WHERE key = ANY($1::text[])

-- upsert_registers --
-- Write registers (the last writer wins).
INSERT INTO sfworkflow.register (key, value, tenant_id, instance_id)
SELECT * FROM unnest($1::text[], $2::jsonb[], $3::uuid[], $4::bigint[])
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, tenant_id = EXCLUDED.tenant_id,
    instance_id = EXCLUDED.instance_id, updated_at = now()

-- delete_effects --
-- Free effect keys whose effect did not happen (only those the instance itself claimed).
DELETE FROM sfworkflow.effect e
USING unnest($1::text[], $2::bigint[]) AS r(effect_key, instance_id)
WHERE e.effect_key = r.effect_key AND e.instance_id = r.instance_id

-- prune_outbox --
-- Retention: published outbox rows older than $1 days (fractions count; a slice of at most $2 rows per call,
-- skipping rows another sweep's slice holds).
DELETE FROM sfworkflow.outbox WHERE id IN (
    SELECT id FROM sfworkflow.outbox WHERE published_at < now() - $1::float8 * interval '1 day' LIMIT $2
    FOR UPDATE SKIP LOCKED)

-- prune_rate_buckets --
-- Retention: rate-limit buckets whose theoretical arrival time passed an hour ago and whose daily count is of an
-- earlier UTC day: such a bucket is the same as none (a new one starts at now, its count at 0), so deleting it
-- changes no slot. At most $1 per call, skipping locked ones.
DELETE FROM sfworkflow.rate_bucket WHERE bucket_key IN (
    SELECT bucket_key FROM sfworkflow.rate_bucket
    WHERE tat < now() - interval '1 hour' AND (cap_day IS NULL OR cap_day < (now() AT TIME ZONE 'UTC')::date)
    LIMIT $1
    FOR UPDATE SKIP LOCKED)

-- prune_inbox --
-- Retention: inbox rows older than $1 days (dedupe covers redeliveries within it).
DELETE FROM sfworkflow.inbox WHERE (tenant_id, event_id) IN (
    SELECT tenant_id, event_id FROM sfworkflow.inbox WHERE received_at < now() - $1::float8 * interval '1 day'
    LIMIT $2 FOR UPDATE SKIP LOCKED)

-- prune_instances --
-- Retention: instances that ended more than $1 days ago, each with everything it owns (history, timers,
-- effect keys, claims, parked events) in this one statement, so no slice leaves an orphan behind. An
-- instance locked right now (a late event for it, another sweep) is skipped: the next slice takes it.
WITH gone AS (
    DELETE FROM sfworkflow.instance WHERE id IN (
        SELECT id FROM sfworkflow.instance
        WHERE terminal AND updated_at < now() - $1::float8 * interval '1 day' LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING id, tenant_id, workflow, entity_id
), h AS (
    DELETE FROM sfworkflow.history WHERE instance_id IN (SELECT id FROM gone)
), t AS (
    DELETE FROM sfworkflow.timer WHERE instance_id IN (SELECT id FROM gone)
), e AS (
    DELETE FROM sfworkflow.effect WHERE instance_id IN (SELECT id FROM gone)
), c AS (
    DELETE FROM sfworkflow.claim WHERE instance_id IN (SELECT id FROM gone)
), p AS (
    DELETE FROM sfworkflow.parked x USING gone g
    WHERE (x.tenant_id, x.workflow, x.entity_id) = (g.tenant_id, g.workflow, g.entity_id)
)
SELECT count(*) FROM gone
