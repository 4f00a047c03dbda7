-- Rate limits on outgoing commands (core/limits.py). A bucket per key (limit, tenant, declared key part) holds its
-- GCRA theoretical arrival time; a batch moves it on for the commands it queues, under the row's lock, so every
-- replica shares one bucket. A bucket whose tat has passed is the same as none: retention deletes it.
CREATE TABLE IF NOT EXISTS sfworkflow.rate_bucket (
    bucket_key  text        PRIMARY KEY,  -- 'sequence.send_step/per_sender|<tenant>|email:-'
    tenant_id   uuid        NOT NULL,
    limit_name  text        NOT NULL,     -- 'sequence.send_step/per_sender'
    tat         timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS rate_bucket_tat_idx ON sfworkflow.rate_bucket (tat);
CREATE INDEX IF NOT EXISTS rate_bucket_tenant_idx ON sfworkflow.rate_bucket (tenant_id);

-- A tenant's own rate for a limit (`sfworkflow limits set`, PUT /v1/limits/{tenant}): read by the statement that
-- reserves the slots, so it applies from the next batch on, on every replica.
CREATE TABLE IF NOT EXISTS sfworkflow.limit_override (
    tenant_id   uuid        NOT NULL,
    limit_name  text        NOT NULL,
    per_s       float8      NOT NULL CHECK (per_s BETWEEN 0.0001 AND 1000000),  -- core/limits.py: check_rate
    burst       integer     NOT NULL CHECK (burst BETWEEN 1 AND 1000000),
    reason      text        NOT NULL,
    updated_by  text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, limit_name)
);

-- A command its rate limit deferred: not published before deferred_until (next_attempt_at starts there), and the
-- limit that deferred it. Nullable, no default: adding them rewrites nothing.
ALTER TABLE sfworkflow.outbox ADD COLUMN IF NOT EXISTS deferred_until timestamptz,
    ADD COLUMN IF NOT EXISTS deferred_by text;

-- The latest slot an instance's messages wait for: a message queued after it (a cancel's workflow.completed, a later
-- command) is deferred to it too, so it neither overtakes the deferred one nor sits due in the relay's way.
ALTER TABLE sfworkflow.instance ADD COLUMN IF NOT EXISTS deferred_until timestamptz;
