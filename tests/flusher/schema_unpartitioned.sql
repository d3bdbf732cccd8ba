-- FROZEN: schema.sql as it was before partitioning (main at 6261903), kept verbatim: what existing
-- databases hold. tests/flusher/test_partitions.py fills a database with it and converts it.
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

-- Daily counts per user and event type (per-user counts; the source of the uniques rollups below).
-- Day-major key: a flush of one day's per-user bucket inserts into one region of the index, retention
-- deletes a key range, "is user U in PostgreSQL on day D" is one probe, and a user's counts over N days
-- are N probes (day = ANY(...) AND user_id = U). It is the table's only index: every index costs the
-- flush a B-tree insert per row (docs/PERFORMANCE.md).
CREATE TABLE IF NOT EXISTS analytics_user_daily (
    pipeline    text        NOT NULL,
    user_id     text        NOT NULL,
    event_type  text        NOT NULL,
    day         date        NOT NULL,
    count       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, day, user_id, event_type)
);

-- Upgrade of databases created before the rollups: their primary key was (pipeline, user_id,
-- event_type, day) with a second index (pipeline, day, event_type, user_id). Re-key the table and drop
-- that index. Rebuilding the key locks the table while it runs (flushes and queries wait).
DO $$
DECLARE
    key_columns text;
    key_name    text;
BEGIN
    SELECT c.conname, string_agg(a.attname, ',' ORDER BY k.ord)
      INTO key_name, key_columns
      FROM pg_constraint c
      CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
     WHERE c.conrelid = 'analytics_user_daily'::regclass AND c.contype = 'p'
     GROUP BY c.conname;
    IF key_columns IS DISTINCT FROM 'pipeline,day,user_id,event_type' THEN
        IF key_name IS NOT NULL THEN
            EXECUTE format('ALTER TABLE analytics_user_daily DROP CONSTRAINT %I', key_name);
        END IF;
        ALTER TABLE analytics_user_daily ADD CONSTRAINT analytics_user_daily_pkey
            PRIMARY KEY (pipeline, day, user_id, event_type);
    END IF;
    IF to_regclass('analytics_user_daily_pipeline_day') IS NOT NULL THEN
        DROP INDEX analytics_user_daily_pipeline_day;
    END IF;
END
$$;

-- Uniques rollups, maintained by the flusher in the same transaction as the per-user rows they are
-- derived from (so they are exactly-once through the ledger), one pipeline at a time (the flusher
-- takes a per-pipeline advisory lock). event_type '' means "any event type" (the event validator
-- refuses empty names, so it never collides with a real one).
--
-- analytics_user_last_seen: the last day each user sent each event type (and '' any event type).
-- Redis users are checked against it ("already counted since day X?") by primary key.
--
-- analytics_daily_uniques, per (event type, day):
--   users            distinct users of that day            = count of analytics_user_daily rows
--   last_seen_users  users whose last day is that day       = count of analytics_user_last_seen rows
-- so distinct users from day X up to the last day with data = sum(last_seen_users) over days >= X,
-- a read of one row per day instead of a distinct count over every (day, user) row.
--
-- Created together; when created (a new database, or one from before the rollups) they are filled
-- from the existing per-user rows in the same transaction, with concurrent flushes held off.
DO $$
BEGIN
    IF to_regclass('analytics_daily_uniques') IS NULL OR to_regclass('analytics_user_last_seen') IS NULL THEN
        LOCK TABLE analytics_user_daily IN SHARE MODE;
        CREATE TABLE IF NOT EXISTS analytics_user_last_seen (
            pipeline    text NOT NULL,
            event_type  text NOT NULL,
            user_id     text NOT NULL,
            last_day    date NOT NULL,
            PRIMARY KEY (pipeline, event_type, user_id)
        );
        CREATE TABLE IF NOT EXISTS analytics_daily_uniques (
            pipeline         text   NOT NULL,
            event_type       text   NOT NULL,
            day              date   NOT NULL,
            users            bigint NOT NULL,
            last_seen_users  bigint NOT NULL,
            PRIMARY KEY (pipeline, event_type, day)
        );
        -- derived data only: (re)computed from analytics_user_daily
        DELETE FROM analytics_user_last_seen;
        DELETE FROM analytics_daily_uniques;
        INSERT INTO analytics_user_last_seen (pipeline, event_type, user_id, last_day)
        SELECT pipeline, event_type, user_id, max(day) FROM analytics_user_daily
         GROUP BY pipeline, event_type, user_id
        UNION ALL
        SELECT pipeline, '', user_id, max(day) FROM analytics_user_daily GROUP BY pipeline, user_id;
        INSERT INTO analytics_daily_uniques (pipeline, event_type, day, users, last_seen_users)
        SELECT pipeline, event_type, day, sum(users), sum(last_seen_users) FROM (
            SELECT pipeline, event_type, day, count(*) AS users, 0 AS last_seen_users
              FROM analytics_user_daily GROUP BY pipeline, event_type, day
            UNION ALL
            SELECT pipeline, '', day, count(DISTINCT user_id), 0 FROM analytics_user_daily GROUP BY pipeline, day
            UNION ALL
            SELECT pipeline, event_type, last_day, 0, count(*) FROM analytics_user_last_seen
             GROUP BY pipeline, event_type, last_day
        ) AS parts GROUP BY pipeline, event_type, day;
    END IF;
END
$$;

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

-- Dead letters (docs/flush-protocol.md "Dead letters"): a flush unit that failed
-- flush.dead_letter_after_failures times is moved here, with its error, so the pipeline's other units
-- keep flowing. Its ledger row is written in the same transaction (a later re-apply of the unit from
-- Redis is a no-op); `analytics-pipeline deadletter retry` applies the counts and deletes the rows in
-- one transaction, `discard` deletes them. The counts table has no unique index over its text columns:
-- whatever made the unit fail (a value PostgreSQL cannot index, say) can be stored here.
CREATE TABLE IF NOT EXISTS analytics_dead_letter (
    pipeline    text        NOT NULL,
    unit_id     text        NOT NULL,
    failures    integer     NOT NULL,
    error       text        NOT NULL,
    buckets     integer     NOT NULL,
    counters    bigint      NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, unit_id)
);
CREATE TABLE IF NOT EXISTS analytics_dead_letter_counts (
    pipeline    text   NOT NULL,
    unit_id     text   NOT NULL,
    kind        text   NOT NULL,   -- d (daily), h (hourly), u (per user): as in the Redis key layout
    bucket      text   NOT NULL,   -- YYYYMMDD or YYYYMMDDHH
    field       text   NOT NULL,   -- event type, or event type + U+001F + user id
    count       bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS analytics_dead_letter_counts_unit ON analytics_dead_letter_counts (pipeline, unit_id);
