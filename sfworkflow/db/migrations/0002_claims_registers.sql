-- Claims and registers: state shared across instances, changed only inside event transactions.

-- A unique key held by one instance (a provider's external id, a commission in an open batch).
-- A second instance asking for a held key is told who holds it (internal event `claim_refused`).
CREATE TABLE sfworkflow.claim (
    claim_key   text        PRIMARY KEY,
    tenant_id   uuid        NOT NULL,
    workflow    text        NOT NULL,
    entity_id   text        NOT NULL,
    instance_id bigint      NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX claim_instance_idx ON sfworkflow.claim (instance_id);

-- A value shared by the instances of a tenant (e.g. the hash of its last successful eval).
CREATE TABLE sfworkflow.register (
    key         text        PRIMARY KEY,
    value       jsonb,
    tenant_id   uuid        NOT NULL,
    instance_id bigint      NOT NULL,   -- the instance that wrote it last
    updated_at  timestamptz NOT NULL DEFAULT now()
);
