-- Every query of the worker SDK's PostgreSQL dedupe store (client/dedupe.py), by name. Its own schema, apart
-- from the service's: a worker's database is SalesFlow's, not necessarily sfworkflow's.

-- create_store --
-- The store's schema and table, created when missing (safe to run from many workers at once).
CREATE SCHEMA IF NOT EXISTS sfworkflow_worker;
CREATE TABLE IF NOT EXISTS sfworkflow_worker.command_answer (
    command_id    uuid PRIMARY KEY,
    command_type  text NOT NULL,
    answers       jsonb,                      -- NULL while a worker holds the claim
    claimed_by    uuid NOT NULL,              -- the worker (process) holding or last holding the claim
    claimed_until timestamptz NOT NULL,       -- a claim past this time may be taken over
    recorded_at   timestamptz                 -- when the answers were recorded
);
CREATE INDEX IF NOT EXISTS command_answer_recorded_idx ON sfworkflow_worker.command_answer USING brin (recorded_at);

-- claim --
-- Claim a command for execution ($1 command_id, $2 command_type, $3 lease in seconds, $4 the claiming worker):
-- a new row, a claim of the same worker (its handling failed midway: a database error, the broker away), or a
-- claim whose lease ran out (its worker died mid-command). Returns a row when claimed now; none when the command
-- was answered already or another worker holds it (read it with answers_of).
INSERT INTO sfworkflow_worker.command_answer AS c (command_id, command_type, claimed_by, claimed_until)
VALUES ($1::uuid, $2, $4::uuid, now() + make_interval(secs => $3))
ON CONFLICT (command_id) DO UPDATE SET claimed_by = EXCLUDED.claimed_by, claimed_until = EXCLUDED.claimed_until
    WHERE c.answers IS NULL AND (c.claimed_by = EXCLUDED.claimed_by OR c.claimed_until < now())
RETURNING command_id

-- answers_of --
-- A command's recorded answers (NULL while claimed) and how long its claim still holds, in seconds.
SELECT answers, greatest(0, extract(epoch FROM claimed_until - now()))::float8 AS claim_left_s
FROM sfworkflow_worker.command_answer WHERE command_id = $1::uuid

-- record --
-- Record the answers of a command claimed by this worker ($1 command_id, $2 answers); the first answers
-- recorded win: returns the answers the command has now.
WITH done AS (
    UPDATE sfworkflow_worker.command_answer SET answers = $2, recorded_at = now()
    WHERE command_id = $1::uuid AND answers IS NULL
    RETURNING answers
)
SELECT answers FROM done
UNION ALL
SELECT answers FROM sfworkflow_worker.command_answer WHERE command_id = $1::uuid AND NOT EXISTS (SELECT 1 FROM done)

-- release --
-- Give a claim up (the handler failed with nothing recorded): a redelivery may execute the command again.
DELETE FROM sfworkflow_worker.command_answer WHERE command_id = $1::uuid AND answers IS NULL

-- prune --
-- Forget answers recorded more than $1 seconds ago, at most $2 rows (a command is not redelivered after that).
DELETE FROM sfworkflow_worker.command_answer
WHERE command_id IN (SELECT command_id FROM sfworkflow_worker.command_answer
                     WHERE recorded_at < now() - make_interval(secs => $1) LIMIT $2)
