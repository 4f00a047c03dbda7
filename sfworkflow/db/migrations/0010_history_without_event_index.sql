-- History is no longer indexed by event_id. Each history row went into this index at a random place (an event's
-- UUID), so once the index outgrew the cache every new row changed a page nobody had touched since the last
-- checkpoint, and each such change wrote a full-page image: at 1M active instances and 10M history rows it was
-- 79.5 of the 195 MB of WAL a drain of 16,000 events wrote. Its one reader, the dead-letter redrive's "was this
-- event applied since?", finds the event's instance by its key (tenant, workflow, entity) and reads that
-- instance's history through history_instance_idx instead.
DROP INDEX IF EXISTS sfworkflow.history_event_idx;
