-- Schedules (core/schedules.py, runtime/schedules.py): a row per schedule, keyed by tenant and name. Code-declared
-- ones (source 'code') are upserted at start-up under the nil tenant; run-time ones (source 'api') come from
-- `sfworkflow schedules add` and the admin API. The schedule loop locks due rows FOR UPDATE SKIP LOCKED, writes each
-- tick's message to the outbox (its id is the tick's: outbox_message dedupes a re-fire) and moves next_tick_at on,
-- in one transaction: two replicas never fire the same tick.
CREATE TABLE IF NOT EXISTS sfworkflow.schedule (
    tenant_id     uuid             NOT NULL,
    name          text             NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,99}$'),
    kind          text             NOT NULL CHECK (kind IN ('event', 'tick')),
    event_type    text             NOT NULL,             -- event: the event published; tick: the routing key
    entity_id     text,                                  -- event: a template ({tick}, {date}); tick: NULL
    data          jsonb            NOT NULL DEFAULT '{}',
    cron          text,
    every_s       integer          CHECK (every_s BETWEEN 1 AND 31622400),
    anchor        timestamptz      NOT NULL DEFAULT now(),  -- intervals count from it
    timezone      text             NOT NULL DEFAULT 'UTC',
    jitter_s      double precision NOT NULL DEFAULT 0 CHECK (jitter_s BETWEEN 0 AND 3600),
    catch_up      text             NOT NULL DEFAULT 'once' CHECK (catch_up IN ('skip', 'once', 'all')),
    max_catch_up  integer          NOT NULL DEFAULT 10 CHECK (max_catch_up BETWEEN 1 AND 1000),
    paused        boolean          NOT NULL DEFAULT false,
    next_tick_at  timestamptz      NOT NULL,             -- the first unfired tick (UTC, jitter not applied)
    due_at        timestamptz      NOT NULL,             -- next_tick_at with its jitter: when the loop takes the row
    last_tick_at  timestamptz,                           -- the latest tick fired
    last_fired_at timestamptz,                           -- when it was fired
    fired         bigint           NOT NULL DEFAULT 0,
    missed        bigint           NOT NULL DEFAULT 0,
    source        text             NOT NULL CHECK (source IN ('code', 'api')),
    workflow      text,                                  -- the definition that declares it (source 'code')
    description   text             NOT NULL DEFAULT '',
    updated_by    text             NOT NULL,
    reason        text             NOT NULL DEFAULT '',
    created_at    timestamptz      NOT NULL DEFAULT now(),
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name),
    CONSTRAINT schedule_cron_or_every CHECK ((cron IS NULL) <> (every_s IS NULL)),
    CONSTRAINT schedule_event_entity CHECK ((kind = 'event') = (entity_id IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS schedule_due_idx ON sfworkflow.schedule (due_at) WHERE NOT paused;
