"""Monthly range partitions of the counter tables: named, bounded, created ahead and on demand, found for retention.

analytics_daily, analytics_hourly and analytics_user_daily are ``PARTITION BY RANGE`` on their time column
(schema.sql) with one partition per UTC month, ``<table>_pYYYYMM``, and no DEFAULT partition: a row of a
month without a partition fails loudly instead of landing in a catch-all that retention cannot drop and
that every later ATTACH would have to scan. So every writer ensures the months it touches first
(:func:`ensure_partitions`: cheap when they exist, idempotent, serialised by the schema's advisory lock so
racing flushers and ``migrate`` never collide). A new partition is created by schema.sql's SECURITY
DEFINER function ``analytics_create_month_partition`` (so a flusher role without DDL rights can), as a
plain table ATTACHed to its parent: ATTACH takes SHARE UPDATE EXCLUSIVE on the parent (flushes and
queries go on), where ``CREATE TABLE ... PARTITION OF`` would take ACCESS EXCLUSIVE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import date, datetime, timedelta

import asyncpg

from analytics_pipeline.core.keys import BucketRef

log = logging.getLogger(__name__)

# partitioned table -> its partition column
PARTITIONED: dict[str, str] = {"analytics_daily": "day", "analytics_hourly": "hour", "analytics_user_daily": "day"}
TABLE_OF_KIND = {"d": "analytics_daily", "h": "analytics_hourly", "u": "analytics_user_daily"}
# How many months after the current one `migrate` and every flush run keep ready (the previous one too).
MONTHS_AHEAD = 2
# The key schema.sql's `SELECT pg_advisory_xact_lock(...)` takes: partition DDL and migrations serialise.
SCHEMA_LOCK_KEY = 7335046153962100001

Partition = tuple[str, date]  # (parent table, first day of the month)


def month_start(moment: date | datetime) -> date:
    """The first day of the (UTC) month of ``moment``."""
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def partition_name(table: str, month: date) -> str:
    return f"{table}_p{month:%Y%m}"


def months_ahead(today: date, ahead: int = MONTHS_AHEAD) -> list[Partition]:
    """The previous month (late buckets of yesterday on the 1st), this month and ``ahead`` following ones,
    for every partitioned table."""
    months = [month_start(month_start(today) - timedelta(days=1)), month_start(today)]
    for _ in range(ahead):
        months.append(next_month(months[-1]))
    return [(table, month) for table in PARTITIONED for month in months]


def partitions_of(refs: Iterable[BucketRef]) -> set[Partition]:
    """The partitions that rows of these buckets land in."""
    return {(TABLE_OF_KIND[ref.kind], month_start(ref.start)) for ref in refs}


_RELKINDS_SQL = """
SELECT c.relname, c.relkind::text AS relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relname = ANY($1::text[])
"""


async def relkinds(conn: asyncpg.Connection, names: Iterable[str]) -> dict[str, str]:
    """relkind (``r`` table, ``p`` partitioned table...) of those of ``names`` in the current schema."""
    return {row["relname"]: row["relkind"] for row in await conn.fetch(_RELKINDS_SQL, list(names))}


async def missing_partitions(conn: asyncpg.Connection, needed: Iterable[Partition]) -> list[Partition]:
    """Those of ``needed`` whose parent is partitioned and that do not exist yet (one catalog query)."""
    wanted = sorted(set(needed))
    if not wanted:
        return []
    kinds = await relkinds(conn, [*PARTITIONED, *(partition_name(t, m) for t, m in wanted)])
    return [(t, m) for t, m in wanted if kinds.get(t) == "p" and partition_name(t, m) not in kinds]


async def ensure_partitions(conn: asyncpg.Connection, needed: Iterable[Partition]) -> list[str]:
    """Create the partitions of ``needed`` that are missing; returns the names created.

    Costs one catalog query when they all exist. Otherwise one short transaction (a savepoint inside
    the caller's) under the schema's advisory lock, re-checked once the lock is held, so two flushers
    (or a flusher and ``migrate``) never create the same partition twice. Call it OUTSIDE a flush
    transaction: the lock would otherwise be held until that unit commits."""
    if not (missing := await missing_partitions(conn, needed)):
        return []
    created: list[str] = []
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
        for table, month in await missing_partitions(conn, missing):
            name = partition_name(table, month)
            try:
                async with conn.transaction():
                    # schema.sql's SECURITY DEFINER function: a flusher role that may not run DDL can call it
                    if not await conn.fetchval("SELECT analytics_create_month_partition($1, $2)", table, month):
                        continue
            except (asyncpg.exceptions.DuplicateTableError, asyncpg.exceptions.UniqueViolationError):
                # created meanwhile by someone not taking our lock (by hand?): it exists, which is all we need
                log.info("partition %s was created concurrently", name)
                continue
            log.info("created partition %s", name)
            created.append(name)
    return created


_CHILDREN_SQL = """
SELECT c.relname, p.relname AS parent FROM pg_inherits i
  JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
  JOIN pg_namespace n ON n.oid = p.relnamespace
 WHERE n.nspname = current_schema() AND p.relname = ANY($1::text[])
"""


async def existing_partitions(conn: asyncpg.Connection) -> list[Partition]:
    """Every partition of the partitioned tables named ``<table>_pYYYYMM`` (others are not ours: ignored)."""
    found: list[Partition] = []
    for row in await conn.fetch(_CHILDREN_SQL, list(PARTITIONED)):
        suffix = row["relname"][len(row["parent"]):]
        if suffix.startswith("_p") and len(suffix) == 8 and suffix[2:].isdigit():
            found.append((row["parent"], date(int(suffix[2:6]), int(suffix[6:8]), 1)))
    return sorted(found)


def past_retention(month: date, today: date, retention_days: int) -> bool:
    """Is every row of that month's partition older than the cutoff (``today - retention_days``) that
    row-by-row retention deletes by (``day < cutoff``, ``hour < cutoff`` at UTC midnight)?"""
    return next_month(month) <= today - timedelta(days=retention_days)


# The pipelines holding rows in a partition, by a loose index scan on its primary key (which starts with
# pipeline): one index probe per pipeline, whatever the partition holds; with their recorded retention.
_HOLDERS_SQL = """
WITH RECURSIVE holders AS (
    SELECT min(pipeline) AS pipeline FROM {partition}
    UNION ALL
    SELECT (SELECT min(pipeline) FROM {partition} WHERE pipeline > h.pipeline) FROM holders h
     WHERE h.pipeline IS NOT NULL
)
SELECT h.pipeline, r.retention_days FROM holders h
  LEFT JOIN analytics_pipeline_retention r ON r.pipeline = h.pipeline
 WHERE h.pipeline IS NOT NULL ORDER BY h.pipeline
"""


async def holders(conn: asyncpg.Connection, table: str, month: date) -> dict[str, int | None]:
    """pipeline -> its recorded retention_days (None: never recorded), for every pipeline with rows there."""
    rows = await conn.fetch(_HOLDERS_SQL.format(partition=partition_name(table, month)))
    return {row["pipeline"]: row["retention_days"] for row in rows}


def droppable(owners: dict[str, int | None], month: date, today: date) -> bool:
    """The drop rule: a partition may go only when it is past the retention of EVERY pipeline holding rows
    in it (each of them would delete all its rows there anyway); a pipeline whose retention was never
    recorded keeps it. An empty partition past the caller's retention goes."""
    return all(days is not None and past_retention(month, today, days) for days in owners.values())
