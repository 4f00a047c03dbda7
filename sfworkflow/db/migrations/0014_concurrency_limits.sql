-- Concurrency limits on outgoing commands (core/limits.py ConcurrencyLimit): at most N commands of a kind in flight
-- per key. A command under one is written *gated*: `gate_key` set and next_attempt_at 'infinity' (never due; the
-- relay's hold-back keeps its instance's later rows behind it), with the timers of its step that start at the grant.
-- The gate loop (runtime/gates.py) grants a key's free slots to its oldest gated rows, under the lock of the key's
-- `slot_gate` row: a `slot` row each, the outbox row due now, its timers set.
ALTER TABLE sfworkflow.outbox ADD COLUMN IF NOT EXISTS gate_key text,
    ADD COLUMN IF NOT EXISTS gate_timers jsonb,
    ADD COLUMN IF NOT EXISTS granted_at timestamptz;
CREATE INDEX IF NOT EXISTS outbox_gated_idx ON sfworkflow.outbox (gate_key, id)
    WHERE gate_key IS NOT NULL AND next_attempt_at = 'infinity' AND published_at IS NULL AND failed_at IS NULL;

-- One row per concurrency key ('agent.run_task/per_tenant|<tenant>|*'): its lock serialises the grants of the key.
CREATE TABLE IF NOT EXISTS sfworkflow.slot_gate (
    gate_key    text        PRIMARY KEY,
    tenant_id   uuid        NOT NULL,
    limit_name  text        NOT NULL
);

-- A slot held: by the instance of the command it was granted to, while the instance is in one of `held_in` (the
-- limit's states, copied at the grant). A batch that moves the instance out of them, or ends it, deletes the row
-- (release_slots); the gate loop's sweep deletes what an operator's action or a deleted instance left.
CREATE TABLE IF NOT EXISTS sfworkflow.slot (
    command_id  uuid        PRIMARY KEY,
    gate_key    text        NOT NULL,
    limit_name  text        NOT NULL,
    tenant_id   uuid        NOT NULL,
    instance_id bigint      NOT NULL,
    held_in     text[]      NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS slot_gate_idx ON sfworkflow.slot (gate_key);
CREATE INDEX IF NOT EXISTS slot_instance_idx ON sfworkflow.slot (instance_id);

-- A tenant's own slots for a concurrency limit, in the same table as its own rates: a row holds either.
ALTER TABLE sfworkflow.limit_override ALTER COLUMN per_s DROP NOT NULL,
    ALTER COLUMN burst DROP NOT NULL,
    ADD COLUMN IF NOT EXISTS slots integer CHECK (slots BETWEEN 1 AND 100000);
ALTER TABLE sfworkflow.limit_override DROP CONSTRAINT IF EXISTS limit_override_rate_or_slots;
ALTER TABLE sfworkflow.limit_override ADD CONSTRAINT limit_override_rate_or_slots
    CHECK ((per_s IS NOT NULL AND burst IS NOT NULL AND slots IS NULL)
           OR (per_s IS NULL AND burst IS NULL AND slots IS NOT NULL));
