-- Trace context (contract/tracing.py). An instance keeps the trace of the event that started it (its trace_id as
-- envelopes carry it, and the W3C traceparent and tracestate its own messages are published with: timers, internal
-- events); a history entry names the trace of what caused it. Nullable, no default: adding them rewrites no table, and rows
-- written before have none (an instance gets one at its next transition).
ALTER TABLE sfworkflow.instance ADD COLUMN IF NOT EXISTS trace_id text, ADD COLUMN IF NOT EXISTS traceparent text,
    ADD COLUMN IF NOT EXISTS tracestate text;
ALTER TABLE sfworkflow.history ADD COLUMN IF NOT EXISTS trace_id text;
