-- analytics-pipeline PostgreSQL schema, applied by `analytics-pipeline migrate` (idempotent).
--
-- Every row is scoped by `pipeline` ("<namespace>/<name>"), so several pipelines share one database.
-- Counts are only ever added to (count = count + EXCLUDED.count) by the flusher, inside the same
-- transaction that records the flush unit in analytics_flush_ledger: the ledger's primary key is what
-- makes a re-applied unit a no-op (exactly once).
--
-- The migration runs in one transaction under an advisory lock, so concurrent `migrate` runs (parallel
-- test sessions, several CronJobs starting at once) serialise instead of racing on CREATE ... IF NOT EXISTS.

SELECT pg_advisory_xact_lock(7335046153962100001);

-- Daily counts per event type.
CREATE TABLE IF NOT EXISTS analytics_daily (
    pipeline    text        NOT NULL,
    event_type  text        NOT NULL,
    day         date        NOT NULL,
    count       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, event_type, day)
);
-- Dashboard: every event type by day for the last 30 days; retention deletes by day.
CREATE INDEX IF NOT EXISTS analytics_daily_pipeline_day ON analytics_daily (pipeline, day) INCLUDE (event_type, count);

-- Hourly counts per event type (UTC hour start).
CREATE TABLE IF NOT EXISTS analytics_hourly (
    pipeline    text        NOT NULL,
    event_type  text        NOT NULL,
    hour        timestamptz NOT NULL,
    count       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, event_type, hour)
);
-- Dashboard: every event type by hour for the last 48 hours; retention deletes by hour.
CREATE INDEX IF NOT EXISTS analytics_hourly_pipeline_hour ON analytics_hourly (pipeline, hour) INCLUDE (event_type, count);

-- Daily counts per user and event type (per-user counts and daily unique users).
CREATE TABLE IF NOT EXISTS analytics_user_daily (
    pipeline    text        NOT NULL,
    user_id     text        NOT NULL,
    event_type  text        NOT NULL,
    day         date        NOT NULL,
    count       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, user_id, event_type, day)
);
-- Daily uniques (count(DISTINCT user_id) per day, optionally for one event type) as an index-only scan.
CREATE INDEX IF NOT EXISTS analytics_user_daily_pipeline_day
    ON analytics_user_daily (pipeline, day, event_type, user_id);

-- One row per flush unit (run id + batch number) that reached PostgreSQL.
CREATE TABLE IF NOT EXISTS analytics_flush_ledger (
    pipeline    text        NOT NULL,
    unit_id     text        NOT NULL,
    run_id      text        NOT NULL,
    batch       integer     NOT NULL,
    buckets     integer     NOT NULL,
    rows        integer     NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, unit_id)
);
-- Ledger retention and "last flush" lookups.
CREATE INDEX IF NOT EXISTS analytics_flush_ledger_pipeline_applied ON analytics_flush_ledger (pipeline, applied_at);
