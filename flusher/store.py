"""The PostgreSQL half of the flush protocol: apply one unit in one transaction, exactly once; retention.

A unit's counts are COPYed into session temp tables and added to the real tables (daily and hourly
with ``INSERT … ON CONFLICT DO UPDATE SET count = t.count + EXCLUDED.count``; per-user rows with one
statement that inserts the new rows and adds to the existing ones), in the same transaction that
inserts the unit into ``analytics_flush_ledger``. A ledger conflict means the unit was applied before
(by a flusher that died before its Redis cleanup, or by a concurrent one): nothing else is written.

The same statement maintains the uniques rollups (``analytics_daily_uniques``,
``analytics_user_last_seen``, see schema.sql) from the unit's per-user rows: the (day, user) and
(day, event, user) pairs PostgreSQL did not hold yet are counted, and users' last days moved. That is
only exact if no other transaction changes those rows meanwhile, so every transaction here first takes
the pipeline's advisory lock: units of one pipeline apply one at a time (whether or not the Redis lock
is in use), pipelines stay parallel. Exactly-once of the rollups then follows from the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from analytics_pipeline.core.keys import USER_FIELD_SEPARATOR

from .partitions import (
    droppable,
    ensure_partitions,
    existing_partitions,
    holders,
    partition_name,
    partitions_of,
    past_retention,
)
from .staging import ReadChunk, StagedBucket, UnitReader, batch_of, run_id_of

log = logging.getLogger(__name__)

LEDGER_RETENTION_DAYS = 30

# pg_advisory_xact_lock(class, hashtext(pipeline)): the two-key form never collides with single-key
# locks such as the migration's. A hash collision between two pipelines only serialises them.
LOCK_CLASS = 1_735_046_153
_LOCK_SQL = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, hashtext($1))"

# Every table holding a pipeline's rows (rollups included), for whoever removes a pipeline's data.
PIPELINE_TABLES = ("analytics_daily", "analytics_hourly", "analytics_user_daily", "analytics_daily_uniques",
                   "analytics_user_last_seen", "analytics_flush_ledger", "analytics_dead_letter",
                   "analytics_dead_letter_counts", "analytics_pipeline_retention")

_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS ap_flush_daily (event_type text, day date, count bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_hourly (event_type text, hour timestamptz, count bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_user_daily (user_id text, event_type text, day date, count bigint)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_user_days (day date, user_id text) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_last_seen (event_type text, user_id text, last_day date)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_scan_daily (LIKE ap_flush_daily) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_scan_hourly (LIKE ap_flush_hourly) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ap_flush_scan_user_daily (LIKE ap_flush_user_daily) ON COMMIT DELETE ROWS;
"""

# Daily and hourly counts: one upsert per table (small: event types x buckets). ORDER BY makes the
# index inserts sequential; rows of a unit are unique (counter_rows merges buckets staged twice; one
# bucket is in one chunk of a unit, or in HSCAN pieces deduplicated through _SCAN_TABLES).
_UPSERT = """
INSERT INTO {target} AS t (pipeline, {columns})
SELECT $1, {columns} FROM {temp} ORDER BY {key}
ON CONFLICT (pipeline, {key}) DO UPDATE SET count = t.count + EXCLUDED.count, updated_at = now()
"""
_UPSERTS = {temp: _UPSERT.format(target=target, temp=temp, key=key, columns=f"{key}, count")
            for temp, target, key in (("ap_flush_daily", "analytics_daily", "event_type, day"),
                                      ("ap_flush_hourly", "analytics_hourly", "event_type, hour"))}

_COLUMNS = {
    "ap_flush_daily": ["event_type", "day", "count"],
    "ap_flush_hourly": ["event_type", "hour", "count"],
    "ap_flush_user_daily": ["user_id", "event_type", "day", "count"],
}
COUNTER_TABLES = ("ap_flush_daily", "ap_flush_hourly", "ap_flush_user_daily")
# Pieces of big buckets read with HSCAN land here first: HSCAN may return a field twice (same count),
# and within a unit a field of a bucket is one row, so SELECT DISTINCT takes exactly the repeats out.
_SCAN_TABLES = {table: table.replace("ap_flush_", "ap_flush_scan_") for table in COUNTER_TABLES}

# The rollups' inputs, from the unit's per-user rows once all of them are COPYed: its distinct
# (day, user) pairs, and each user's last day in the unit per event type and for any event type.
_ROLLUP_INPUTS_SQL = """
INSERT INTO ap_flush_user_days (day, user_id) SELECT DISTINCT day, user_id FROM ap_flush_user_daily;
INSERT INTO ap_flush_last_seen (event_type, user_id, last_day)
SELECT event_type, user_id, max(day) FROM ap_flush_user_daily GROUP BY event_type, user_id
UNION ALL
SELECT '', user_id, max(day) FROM ap_flush_user_daily GROUP BY user_id;
"""

# The per-user rows and both rollups of a unit in ONE statement: every part sees the tables as they
# were before it (one snapshot), so "does PostgreSQL hold this row / this (day, user) yet" is decided
# once per row by a key probe and drives everything else:
#   - rows it does not hold are plain INSERTs (no ON CONFLICT: a speculative insertion per row cost
#     twice as much; safe because a unit's rows are unique and the pipeline's lock keeps every other
#     writer out), rows it holds are upserted (count added);
#   - each new (day, event, user) row and each new (day, user) pair adds 1 to that day's `users`;
#   - a user whose last day moves forward moves from the old day's `last_seen_users` to the new one.
# The probes sit in SELECT lists, so they stay per-row index probes (O(unit)) and are never turned into
# joins that read a whole pipeline's rows.
_USER_ROWS_SQL = """
WITH incoming AS MATERIALIZED (
    SELECT f.day, f.user_id, f.event_type, f.count,
           EXISTS (SELECT 1 FROM analytics_user_daily u WHERE u.pipeline = $1 AND u.day = f.day
                      AND u.user_id = f.user_id AND u.event_type = f.event_type) AS known
      FROM ap_flush_user_daily f
), day_users AS MATERIALIZED (
    SELECT f.day, EXISTS (SELECT 1 FROM analytics_user_daily u WHERE u.pipeline = $1 AND u.day = f.day
                             AND u.user_id = f.user_id) AS known
      FROM ap_flush_user_days f
), last_seen AS MATERIALIZED (
    SELECT f.event_type, f.user_id, f.last_day,
           (SELECT s.last_day FROM analytics_user_last_seen s
             WHERE s.pipeline = $1 AND s.event_type = f.event_type AND s.user_id = f.user_id) AS old_day
      FROM ap_flush_last_seen f
), inserted AS (
    INSERT INTO analytics_user_daily (pipeline, day, user_id, event_type, count)
    SELECT $1, day, user_id, event_type, count FROM incoming WHERE NOT known
), added AS (
    INSERT INTO analytics_user_daily AS t (pipeline, day, user_id, event_type, count)
    SELECT $1, day, user_id, event_type, count FROM incoming WHERE known
    ON CONFLICT (pipeline, day, user_id, event_type) DO UPDATE SET count = t.count + EXCLUDED.count, updated_at = now()
), first_seen AS (
    INSERT INTO analytics_user_last_seen (pipeline, event_type, user_id, last_day)
    SELECT $1, event_type, user_id, last_day FROM last_seen WHERE old_day IS NULL
), seen_again AS (
    INSERT INTO analytics_user_last_seen AS t (pipeline, event_type, user_id, last_day)
    SELECT $1, event_type, user_id, last_day FROM last_seen WHERE old_day < last_day
    ON CONFLICT (pipeline, event_type, user_id) DO UPDATE SET last_day = EXCLUDED.last_day
), deltas (event_type, day, users, last_seen_users) AS (
    SELECT event_type, day, 1, 0 FROM incoming WHERE NOT known
    UNION ALL SELECT '', day, 1, 0 FROM day_users WHERE NOT known
    UNION ALL SELECT event_type, last_day, 0, 1 FROM last_seen WHERE old_day IS NULL OR old_day < last_day
    UNION ALL SELECT event_type, old_day, 0, -1 FROM last_seen WHERE old_day < last_day
)
INSERT INTO analytics_daily_uniques AS t (pipeline, event_type, day, users, last_seen_users)
SELECT $1, event_type, day, sum(users), sum(last_seen_users) FROM deltas GROUP BY event_type, day
ON CONFLICT (pipeline, event_type, day) DO UPDATE
   SET users = t.users + EXCLUDED.users, last_seen_users = t.last_seen_users + EXCLUDED.last_seen_users
"""

# Recompute one pipeline's rollups from its per-user rows (what schema.sql's back-fill does for every
# pipeline when it creates the tables).
_REBUILD_SQL = (
    "DELETE FROM analytics_user_last_seen WHERE pipeline = $1",
    "DELETE FROM analytics_daily_uniques WHERE pipeline = $1",
    """
    INSERT INTO analytics_user_last_seen (pipeline, event_type, user_id, last_day)
    SELECT $1, event_type, user_id, max(day) FROM analytics_user_daily WHERE pipeline = $1 GROUP BY event_type, user_id
    UNION ALL
    SELECT $1, '', user_id, max(day) FROM analytics_user_daily WHERE pipeline = $1 GROUP BY user_id
    """,
    """
    INSERT INTO analytics_daily_uniques (pipeline, event_type, day, users, last_seen_users)
    SELECT $1, event_type, day, sum(users), sum(last_seen_users) FROM (
        SELECT event_type, day, count(*) AS users, 0 AS last_seen_users
          FROM analytics_user_daily WHERE pipeline = $1 GROUP BY event_type, day
        UNION ALL
        SELECT '', day, count(DISTINCT user_id), 0 FROM analytics_user_daily WHERE pipeline = $1 GROUP BY day
        UNION ALL
        SELECT event_type, last_day, 0, count(*) FROM analytics_user_last_seen WHERE pipeline = $1
         GROUP BY event_type, last_day
    ) AS parts GROUP BY event_type, day
    """,
)

_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


@dataclass
class ApplyResult:
    """What applying a unit did: ``applied`` False means the ledger already had it (skipped)."""

    applied: bool
    buckets: int
    rows: int


def merged(buckets: list[StagedBucket]) -> list[StagedBucket]:
    """The buckets with any bucket staged twice summed into one, so every row of a unit is unique."""
    seen: dict[tuple[str, str], StagedBucket] = {}
    for staged in buckets:
        key = (staged.ref.kind, staged.ref.bucket)
        if key not in seen:
            seen[key] = staged
            continue
        log.warning("bucket %s:%s staged twice in one unit; summing it", *key)
        total = dict(seen[key].counts)
        for name, count in staged.counts.items():
            total[name] = total.get(name, 0) + count
        seen[key] = StagedBucket(staged.ref, total)
    return list(seen.values()) if len(seen) < len(buckets) else buckets


def counter_rows(buckets: list[StagedBucket]) -> dict[str, list[tuple[object, ...]]]:
    """Temp-table records of staged buckets per counter temp table (zero counts dropped). The rollup
    inputs (distinct (day, user) pairs, each user's last day) are derived from them in SQL
    (``_ROLLUP_INPUTS_SQL``), so a unit can be read and COPYed a chunk at a time."""
    daily: list[tuple[object, ...]] = []
    hourly: list[tuple[object, ...]] = []
    user_daily: list[tuple[object, ...]] = []
    names: dict[str, str] = {}  # one string object per event type, not one per counter (memory)
    separator = USER_FIELD_SEPARATOR  # split_user_field(), inlined: this loop sees every counter
    for staged in merged(buckets):
        kind = staged.ref.kind
        counts = staged.counts
        if kind == "d":
            day = staged.ref.start.date()
            daily += [(field, day, count) for field, count in counts.items() if count]
        elif kind == "h":
            start = staged.ref.start
            hourly += [(field, start, count) for field, count in counts.items() if count]
        else:
            day = staged.ref.start.date()
            for field, count in counts.items():
                if count:
                    event_type, _, user_id = field.partition(separator)
                    user_daily.append((user_id, names.setdefault(event_type, event_type), day, count))
    return {"ap_flush_daily": daily, "ap_flush_hourly": hourly, "ap_flush_user_daily": user_daily}


async def lock_pipeline(conn: asyncpg.Connection, pipeline: str) -> None:
    """Take the pipeline's transaction-scoped advisory lock (released at COMMIT/ROLLBACK)."""
    await conn.execute(_LOCK_SQL, pipeline)


async def apply_unit(conn: asyncpg.Connection, pipeline: str, unit_id: str, unit: list[StagedBucket] | UnitReader,
                     *, in_transaction: Callable[[], Awaitable[None]] | None = None, attempts: int = 5) -> ApplyResult:
    """Write a unit's counts, rollups and ledger row in ONE transaction; skip everything if the ledger has it.

    ``unit`` is either its buckets or a :class:`UnitReader`, which is read from Redis a chunk at a
    time inside the transaction: the flusher then holds one chunk, never the whole unit.
    ``in_transaction`` runs after the upserts and before COMMIT (the fault-injection hook).
    Deadlocks/serialization failures between concurrent flushers are retried (safe: the ledger decides).
    """
    bucket_count = unit.bucket_count if isinstance(unit, UnitReader) else len(unit)
    # the months it writes must have partitions: created before (never inside) the unit's transaction
    await ensure_partitions(conn, partitions_of(unit.refs if isinstance(unit, UnitReader) else
                                                (staged.ref for staged in unit)))
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await lock_pipeline(conn, pipeline)
                inserted = await conn.fetchval(
                    "INSERT INTO analytics_flush_ledger (pipeline, unit_id, run_id, batch, buckets, rows) "
                    "VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT DO NOTHING RETURNING 1",
                    pipeline, unit_id, run_id_of(unit_id), batch_of(unit_id), bucket_count)
                if not inserted:
                    return ApplyResult(False, bucket_count, 0)
                await conn.execute(_TEMP_TABLES)
                copied = dict.fromkeys(COUNTER_TABLES, 0)
                scanned: set[str] = set()
                async for chunk in _chunks(unit):
                    for table, rows in counter_rows(chunk.buckets).items():
                        if rows and chunk.may_repeat:
                            await conn.copy_records_to_table(_SCAN_TABLES[table], records=rows,
                                                             columns=_COLUMNS[table])
                            scanned.add(table)
                        elif rows:
                            await conn.copy_records_to_table(table, records=rows, columns=_COLUMNS[table])
                            copied[table] += len(rows)
                    del chunk  # before the next chunk is read: one chunk in memory, not two
                for table in scanned:
                    status = await conn.execute(f"INSERT INTO {table} SELECT DISTINCT * FROM {_SCAN_TABLES[table]}")
                    copied[table] += int(status.split()[-1])  # "INSERT 0 <rows>"
                for table, upsert in _UPSERTS.items():
                    if copied[table]:
                        await conn.execute(upsert, pipeline)
                if copied["ap_flush_user_daily"]:
                    await conn.execute(_ROLLUP_INPUTS_SQL)
                    await conn.execute(_USER_ROWS_SQL, pipeline)
                total_rows = sum(copied.values())
                await conn.execute("UPDATE analytics_flush_ledger SET rows = $3 WHERE pipeline = $1 AND unit_id = $2",
                                   pipeline, unit_id, total_rows)
                if in_transaction is not None:
                    await in_transaction()
            return ApplyResult(True, bucket_count, total_rows)
        except _RETRYABLE as error:
            if attempt == attempts:
                raise
            log.warning("unit %s: %s; retrying (%d/%d)", unit_id, type(error).__name__, attempt, attempts)
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def _chunks(unit: list[StagedBucket] | UnitReader) -> AsyncIterator[ReadChunk]:
    """The unit's counts in chunks: as read from Redis, or all at once when already in memory."""
    if isinstance(unit, UnitReader):
        async for chunk in unit.chunks():
            yield chunk
    elif unit:
        yield ReadChunk(unit)


async def rebuild_rollups(conn: asyncpg.Connection, pipeline: str) -> None:
    """Recompute a pipeline's uniques rollups from its per-user rows, in one transaction under its lock.

    Not needed in normal operation (every flush keeps them exact); for rows written by other means
    (bulk loads, hand edits, an older flusher that ran after the migration)."""
    async with conn.transaction():
        await lock_pipeline(conn, pipeline)
        for statement in _REBUILD_SQL:
            await conn.execute(statement, pipeline)


# How long a retention step waits for a lock before it leaves a partition for the next run (and deletes
# its own rows in it one by one meanwhile): dropping needs ACCESS EXCLUSIVE on the parent table.
DROP_LOCK_TIMEOUT = "2s"


async def apply_retention(conn: asyncpg.Connection, pipeline: str, retention_days: int,
                          keep_units: list[str]) -> int:
    """Remove this pipeline's rows older than ``retention_days`` and ledger rows older than 30 days.

    First records the pipeline's retention and drops every partition past the retention of every pipeline
    holding rows in it (:func:`drop_expired_partitions`); what remains of its old rows (in partitions
    another pipeline still keeps) is deleted row by row. Ledger rows of units still in flight are kept,
    so a recovery never re-applies a unit twice. The rollups lose the same days (under the pipeline's
    lock, like a unit): users whose last day is older are gone from the per-user rows too. Returns how
    many of this pipeline's counter and ledger rows went.
    """
    deleted = await drop_expired_partitions(conn, pipeline, retention_days)
    async with conn.transaction():
        await lock_pipeline(conn, pipeline)
        for statement in (
            "DELETE FROM analytics_daily WHERE pipeline = $1 AND day < current_date - $2::int",
            "DELETE FROM analytics_user_daily WHERE pipeline = $1 AND day < current_date - $2::int",
            "DELETE FROM analytics_hourly WHERE pipeline = $1 "
            "AND hour < date_trunc('day', now()) - make_interval(days => $2::int)",
        ):
            status = await conn.execute(statement, pipeline, retention_days)
            deleted += int(status.split()[-1])
        await _trim_rollups(conn, pipeline, retention_days)
        status = await conn.execute(
            "DELETE FROM analytics_flush_ledger WHERE pipeline = $1 "
            "AND applied_at < now() - make_interval(days => $2::int) AND NOT (unit_id = ANY($3::text[]))",
            pipeline, LEDGER_RETENTION_DAYS, keep_units)
        deleted += int(status.split()[-1])
    return deleted


async def _trim_rollups(conn: asyncpg.Connection, pipeline: str, retention_days: int) -> None:
    """Drop a pipeline's rollup rows of the days its retention removed (caller holds its lock)."""
    # last_seen rows are found by scanning the pipeline's users: only when the histogram says some
    # user's last day is old enough, i.e. at most once per day.
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM analytics_daily_uniques WHERE pipeline = $1 "
                           "AND day < current_date - $2::int AND last_seen_users <> 0)", pipeline, retention_days):
        await conn.execute("DELETE FROM analytics_user_last_seen WHERE pipeline = $1 "
                           "AND last_day < current_date - $2::int", pipeline, retention_days)
    await conn.execute("DELETE FROM analytics_daily_uniques WHERE pipeline = $1 AND day < current_date - $2::int",
                       pipeline, retention_days)


class _HoldersChanged(Exception):
    """A pipeline wrote into a partition between the check and the lock: leave it for the next run."""


async def drop_expired_partitions(conn: asyncpg.Connection, pipeline: str, retention_days: int) -> int:
    """Record this pipeline's retention, then drop each partition that is past it AND past the recorded
    retention of every pipeline holding rows in it (see partitions.droppable); returns how many of this
    pipeline's rows those partitions held.

    Per partition, one transaction: every holder's advisory lock (try-lock: a holder flushing right now
    makes it wait for the next run), ACCESS EXCLUSIVE on the parent (lock_timeout: a long query does the
    same), the holders checked again, DROP, and for the per-user table each holder's rollups trimmed to
    its own retention (exactly what its own retention step would do, so its rollups stay equal to a
    recomputation from its rows). Anything in the way only postpones the drop: row deletes cover it."""
    await conn.execute(
        "INSERT INTO analytics_pipeline_retention AS r (pipeline, retention_days) VALUES ($1, $2) "
        "ON CONFLICT (pipeline) DO UPDATE SET retention_days = EXCLUDED.retention_days, updated_at = now() "
        "WHERE r.retention_days IS DISTINCT FROM EXCLUDED.retention_days", pipeline, retention_days)
    today = await conn.fetchval("SELECT current_date")
    removed = 0
    for table, month in await existing_partitions(conn):
        if not past_retention(month, today, retention_days):
            continue
        try:
            owners = await holders(conn, table, month)
        except asyncpg.exceptions.UndefinedTableError:  # dropped meanwhile by another pipeline's retention
            continue
        if not droppable(owners, month, today):
            continue
        name = partition_name(table, month)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
                for owner in sorted(owners):
                    if not await conn.fetchval(f"SELECT pg_try_advisory_xact_lock({LOCK_CLASS}, hashtext($1))", owner):
                        raise _HoldersChanged(f"pipeline {owner} is flushing")
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                if await holders(conn, table, month) != owners:
                    raise _HoldersChanged("rows were written meanwhile")
                mine = await conn.fetchval(f"SELECT count(*) FROM {name} WHERE pipeline = $1", pipeline)
                await conn.execute(f"DROP TABLE {name}")
                if table == "analytics_user_daily":
                    for owner, days in owners.items():
                        await _trim_rollups(conn, owner, days or retention_days)
        except (_HoldersChanged, asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.DeadlockDetectedError,
                asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.InsufficientPrivilegeError) as error:
            # InsufficientPrivilege: a flusher role that does not own the tables (docs/kubernetes.md) may not
            # DROP: its old rows go by the row deletes, as before partitioning
            log.info("partition %s kept for now (%s): its old rows are deleted row by row", name, error)
            continue
        log.info("dropped partition %s (past the retention of %d pipeline(s))", name, len(owners))
        removed += mine
    return removed
