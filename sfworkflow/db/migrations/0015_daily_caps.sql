-- Daily caps on rate limits (core/limits.py: RateLimit.daily_cap, reserve). A capped bucket counts the slots booked
-- on the UTC day of its latest slot; a batch that books on it writes the count back under the row's lock. Uncapped
-- buckets leave both as they are. Adding a nullable column, or one whose default is a constant, rewrites nothing.
ALTER TABLE sfworkflow.rate_bucket ADD COLUMN IF NOT EXISTS cap_day date,
    ADD COLUMN IF NOT EXISTS cap_used integer NOT NULL DEFAULT 0;

-- A tenant's own daily cap for a rate limit, with or without its own rate (NULL: the cap in force stays).
ALTER TABLE sfworkflow.limit_override
    ADD COLUMN IF NOT EXISTS daily_cap integer CHECK (daily_cap BETWEEN 1 AND 1000000000);  -- core/limits: check_cap
ALTER TABLE sfworkflow.limit_override DROP CONSTRAINT IF EXISTS limit_override_rate_or_slots;
ALTER TABLE sfworkflow.limit_override ADD CONSTRAINT limit_override_rate_or_slots
    CHECK ((slots IS NULL AND (per_s IS NULL) = (burst IS NULL) AND (per_s IS NOT NULL OR daily_cap IS NOT NULL))
           OR (slots IS NOT NULL AND per_s IS NULL AND burst IS NULL AND daily_cap IS NULL));

-- The capped bucket's slots on cap_day follow a day its cap filled: what it books until that day comes is the cap's
-- doing (the history entry says so).
ALTER TABLE sfworkflow.rate_bucket ADD COLUMN IF NOT EXISTS cap_pushed boolean NOT NULL DEFAULT false;
