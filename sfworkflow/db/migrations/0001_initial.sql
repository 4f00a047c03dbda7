-- sfworkflow schema, version 1: instances, inbox, history, timers, effects, parked events, outbox.
CREATE SCHEMA IF NOT EXISTS sfworkflow;

-- One row per workflow instance, identified by (tenant_id, workflow, entity_id).
CREATE TABLE sfworkflow.instance (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id          uuid        NOT NULL,
    workflow           text        NOT NULL,
    entity_id          text        NOT NULL,
    definition_version integer     NOT NULL,
    state              text        NOT NULL,
    context            jsonb       NOT NULL DEFAULT '{}',
    version            bigint      NOT NULL DEFAULT 0,     -- transitions applied so far
    terminal           boolean     NOT NULL DEFAULT false,
    parked_count       integer     NOT NULL DEFAULT 0,     -- hint: parked events may be waiting
    correlation_id     text,
    last_event_id      uuid,
    last_event_type    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    state_entered_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT instance_key UNIQUE (tenant_id, workflow, entity_id)
);
CREATE INDEX instance_active_idx ON sfworkflow.instance (workflow, state) WHERE NOT terminal;

-- Every event ever accepted, keyed for dedupe: a second delivery of (tenant_id, event_id) is a duplicate.
CREATE TABLE sfworkflow.inbox (
    tenant_id   uuid        NOT NULL,
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    entity_id   text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id)
);

-- What happened to each instance, in order: applied transitions, ignored events, suppressed effects.
CREATE TABLE sfworkflow.history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id bigint      NOT NULL,
    seq         bigint      NOT NULL,                 -- instance version after this entry
    event_id    uuid,
    event_type  text        NOT NULL,
    outcome     text        NOT NULL,                 -- applied | ignored | suppressed
    from_state  text,
    to_state    text,
    detail      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX history_instance_idx ON sfworkflow.history (instance_id, id);
CREATE INDEX history_event_idx ON sfworkflow.history (event_id);

-- Durable timers: step delays, retry backoff. Changed only by holders of the instance row lock.
CREATE TABLE sfworkflow.timer (
    instance_id bigint      NOT NULL,
    name        text        NOT NULL,
    due_at      timestamptz NOT NULL,
    payload     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, name)
);
CREATE INDEX timer_due_idx ON sfworkflow.timer (due_at);

-- Side effects held unique: a second request for the same effect key is suppressed.
CREATE TABLE sfworkflow.effect (
    effect_key      text        PRIMARY KEY,
    tenant_id       uuid        NOT NULL,
    instance_id     bigint      NOT NULL,
    command_id      uuid        NOT NULL,
    idempotency_key text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Events not allowed in their instance's current state (or before it exists), retried after each
-- transition of that instance and dead-lettered `transition_not_allowed` past their deadline.
CREATE TABLE sfworkflow.parked (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid        NOT NULL,
    workflow    text        NOT NULL,
    entity_id   text        NOT NULL,
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    body        bytea       NOT NULL,
    headers     jsonb       NOT NULL DEFAULT '{}',
    reason      text        NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    deadline    timestamptz NOT NULL,
    CONSTRAINT parked_event UNIQUE (tenant_id, event_id)
);
CREATE INDEX parked_instance_idx ON sfworkflow.parked (tenant_id, workflow, entity_id, id);
CREATE INDEX parked_deadline_idx ON sfworkflow.parked (deadline);

-- Transactional outbox: every message sfworkflow publishes (commands, compensations, lifecycle
-- events, dead letters) is a row written in the transaction that decided it.
CREATE TABLE sfworkflow.outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       uuid        NOT NULL,
    kind             text        NOT NULL,           -- command | compensation | lifecycle | dead_letter
    exchange         text        NOT NULL,
    routing_key      text        NOT NULL,
    instance_id      bigint,
    body             bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}',
    mandatory        boolean     NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    publish_attempts integer     NOT NULL DEFAULT 0,
    last_error       text,
    CONSTRAINT outbox_message UNIQUE (message_id)
);
CREATE INDEX outbox_pending_idx ON sfworkflow.outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_instance_idx ON sfworkflow.outbox (instance_id) WHERE instance_id IS NOT NULL;
