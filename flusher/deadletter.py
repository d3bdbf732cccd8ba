"""Dead letters: a flush unit that keeps failing is set aside, visibly, so the rest of its pipeline flows.

Without this, a unit PostgreSQL refuses (a value it cannot index, a trigger, a bug) failed every run:
each run recovers in-flight units first, so no later unit of the pipeline ever reached PostgreSQL.

- A failed apply of a unit is counted in Redis (``HINCRBY ap:{p}:unitfails <unit>``). Failures that
  are not the unit's fault (Redis or PostgreSQL unreachable, schema missing, out of disk, ...) are not
  counted: :func:`is_unit_failure` decides.
- At ``flush.dead_letter_after_failures`` the unit is moved, in ONE transaction under the pipeline's
  advisory lock: its ledger row (so re-applying it from Redis is a no-op, whatever happens next), a row
  in ``analytics_dead_letter`` (error, failures, size) and its counts in ``analytics_dead_letter_counts``.
  Then its Redis staging keys are cleaned up as after any commit.
- :func:`retry` applies the stored counts as unit ``<unit>.retry`` (its own ledger row) and deletes the
  dead letter in ONE transaction; :func:`discard` deletes it. Either happens exactly once: the
  ``DELETE … RETURNING`` of the dead letter row, under the pipeline's lock, is the token; a process killed
  mid-way committed all of it or nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from analytics_pipeline.core.keys import BucketRef, PipelineKeys

from .errors import POSTGRES_CONNECTION_ERRORS, REDIS_CONNECTION_ERRORS, FlushError
from .staging import StagedBucket, UnitReader, batch_of, run_id_of
from .store import ApplyResult, apply_unit, lock_pipeline

log = logging.getLogger(__name__)

RETRY_SUFFIX = ".retry"

# SQLSTATE classes that say nothing about the unit: connection, transaction state, authorization,
# catalog/schema (our SQL or a missing migration), resources (disk, memory), lock/object state, operator
# intervention, system I/O, configuration. Everything else (data exceptions 22, integrity 23, program
# limits 54 such as "index row size exceeds btree maximum", trigger RAISEs P0, internal XX) counts.
_NOT_THE_UNIT = frozenset({"08", "25", "28", "3D", "3F", "40", "42", "53", "55", "57", "58", "F0"})

_DEAD_COLUMNS = ["pipeline", "unit_id", "kind", "bucket", "field", "count"]
_DEAD_SCAN_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS ap_dead_scan (LIKE analytics_dead_letter_counts) ON COMMIT DELETE ROWS
"""


class UnitFailed(FlushError):
    """A unit's apply failed and it was not set aside yet (the next run tries it again)."""


@dataclass(frozen=True)
class DeadLetter:
    """One set-aside unit: why, after how many failed runs, and how much it holds."""

    pipeline: str
    unit_id: str
    failures: int
    error: str
    buckets: int
    counters: int
    dead_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "unit_id": self.unit_id, "failures": self.failures, "error": self.error,
                "buckets": self.buckets, "counters": self.counters, "dead_at": self.dead_at.isoformat()}


def is_unit_failure(error: BaseException) -> bool:
    """Whether ``error`` (raised while applying a unit) counts against the unit."""
    if isinstance(error, (FlushError, *REDIS_CONNECTION_ERRORS, *POSTGRES_CONNECTION_ERRORS)):
        return False
    if isinstance(error, asyncpg.PostgresError):
        return (error.sqlstate or "XX")[:2] not in _NOT_THE_UNIT
    if isinstance(error, redis.exceptions.RedisError):
        return "WRONGTYPE" in str(error)  # a staging key that is not a hash; OOM, READONLY, ... are not the unit's
    return isinstance(error, Exception)  # a count that is not an integer, a bug on this unit's data, ...


async def count_failure(client: aioredis.Redis, keys: PipelineKeys, unit_id: str) -> int:
    """Record one more failed apply of an in-flight unit; returns its failures so far."""
    return int(await client.hincrby(keys.unit_failures, unit_id, 1))


async def forget_failures(client: aioredis.Redis, keys: PipelineKeys, unit_id: str) -> None:
    """Drop a unit's failure count once it left Redis (committed, or set aside)."""
    await client.hdel(keys.unit_failures, unit_id)


async def move_unit(conn: asyncpg.Connection, pipeline: str, unit_id: str, unit: UnitReader, failures: int,
                    error: str) -> bool:
    """Store a unit's counts and error as a dead letter, with its ledger row, in one transaction.

    False if the ledger already had the unit (it was applied after all; nothing stored): either way the
    caller then deletes the unit from Redis.
    """
    async with conn.transaction():
        await lock_pipeline(conn, pipeline)
        inserted = await conn.fetchval(
            "INSERT INTO analytics_flush_ledger (pipeline, unit_id, run_id, batch, buckets, rows) "
            "VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT DO NOTHING RETURNING 1",
            pipeline, unit_id, run_id_of(unit_id), batch_of(unit_id), unit.bucket_count)
        if not inserted:
            return False
        counters = 0
        scanned = False
        async for chunk in unit.chunks():
            rows = [(pipeline, unit_id, staged.ref.kind, staged.ref.bucket, field, count)
                    for staged in chunk.buckets for field, count in staged.counts.items() if count]
            if rows and chunk.may_repeat:  # an HSCAN piece may repeat a field: taken out below
                if not scanned:
                    await conn.execute(_DEAD_SCAN_TABLE)
                    scanned = True
                await conn.copy_records_to_table("ap_dead_scan", records=rows, columns=_DEAD_COLUMNS)
            elif rows:
                await conn.copy_records_to_table("analytics_dead_letter_counts", records=rows, columns=_DEAD_COLUMNS)
                counters += len(rows)
        if scanned:
            status = await conn.execute("INSERT INTO analytics_dead_letter_counts SELECT DISTINCT * FROM ap_dead_scan")
            counters += int(status.split()[-1])
        await conn.execute(
            "INSERT INTO analytics_dead_letter (pipeline, unit_id, failures, error, buckets, counters) "
            "VALUES ($1, $2, $3, $4, $5, $6)", pipeline, unit_id, failures, error[:4000], unit.bucket_count, counters)
    return True


async def pending(conn: asyncpg.Connection, pipeline: str | None = None) -> list[DeadLetter]:
    """Dead letters of one pipeline (or of all), oldest first."""
    rows = await conn.fetch(
        "SELECT pipeline, unit_id, failures, error, buckets, counters, dead_at FROM analytics_dead_letter "
        "WHERE $1::text IS NULL OR pipeline = $1 ORDER BY dead_at, pipeline, unit_id", pipeline)
    return [DeadLetter(**dict(row)) for row in rows]


async def count(conn: asyncpg.Connection, pipeline: str) -> int:
    """How many dead letters a pipeline has."""
    return int(await conn.fetchval("SELECT count(*) FROM analytics_dead_letter WHERE pipeline = $1", pipeline))


async def retry(conn: asyncpg.Connection, pipeline: str, unit_id: str, *,
                in_transaction: Callable[[], Awaitable[None]] | None = None) -> ApplyResult | None:
    """Apply a dead letter's counts and delete it, in one transaction; None if there is no such dead letter
    (already retried or discarded). An apply that fails again raises and leaves the dead letter as it was."""
    async with conn.transaction():
        await lock_pipeline(conn, pipeline)
        if not await conn.fetchval("DELETE FROM analytics_dead_letter WHERE pipeline = $1 AND unit_id = $2 "
                                   "RETURNING 1", pipeline, unit_id):
            return None
        rows = await conn.fetch("DELETE FROM analytics_dead_letter_counts WHERE pipeline = $1 AND unit_id = $2 "
                                "RETURNING kind, bucket, field, count", pipeline, unit_id)
        buckets: dict[tuple[str, str], dict[str, int]] = {}
        for row in rows:
            counts = buckets.setdefault((row["kind"], row["bucket"]), {})
            counts[row["field"]] = counts.get(row["field"], 0) + row["count"]
        staged = [StagedBucket(BucketRef(kind, bucket), counts)  # type: ignore[arg-type]
                  for (kind, bucket), counts in sorted(buckets.items())]
        # a savepoint inside this transaction: the unit's counts, rollups and its own ledger row
        return await apply_unit(conn, pipeline, unit_id + RETRY_SUFFIX, staged, in_transaction=in_transaction,
                                attempts=1)


async def discard(conn: asyncpg.Connection, pipeline: str, unit_id: str) -> DeadLetter | None:
    """Delete a dead letter and its counts (they are never applied); None if there is no such dead letter."""
    async with conn.transaction():
        await lock_pipeline(conn, pipeline)
        row = await conn.fetchrow(
            "DELETE FROM analytics_dead_letter WHERE pipeline = $1 AND unit_id = $2 "
            "RETURNING pipeline, unit_id, failures, error, buckets, counters, dead_at", pipeline, unit_id)
        if row is None:
            return None
        await conn.execute("DELETE FROM analytics_dead_letter_counts WHERE pipeline = $1 AND unit_id = $2",
                           pipeline, unit_id)
    log.warning("pipeline %s: discarded dead letter %s (%d counters)", pipeline, unit_id, row["counters"])
    return DeadLetter(**dict(row))
