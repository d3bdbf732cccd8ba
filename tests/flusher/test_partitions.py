"""Monthly partitions: created ahead and on demand (racing creators included), an unpartitioned database
converted in place with nothing lost (atomically, re-run a no-op), retention dropping whole partitions
only when they are past every pipeline's retention. Each test works in its own throwaway schema."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from flushkit import assert_rollups_exact, pg_counters

from analytics_pipeline.core.keys import BucketRef, day_bucket, hour_bucket, user_field
from analytics_pipeline.flusher import migrate
from analytics_pipeline.flusher.migrate import apply_schema
from analytics_pipeline.flusher.partitions import (
    PARTITIONED,
    SCHEMA_LOCK_KEY,
    ensure_partitions,
    existing_partitions,
    month_start,
    months_ahead,
    next_month,
    partition_name,
    relkinds,
)
from analytics_pipeline.flusher.staging import StagedBucket
from analytics_pipeline.flusher.store import apply_retention, apply_unit

FROZEN_SCHEMA = (Path(__file__).parent / "schema_unpartitioned.sql").read_text(encoding="utf-8")
NOW = datetime.now(UTC)
TODAY = NOW.date()
PIPELINES = ("test/part-a", "test/part-b")


@pytest.fixture
async def scratch(schema: str) -> AsyncIterator[tuple[str, str]]:
    """A throwaway PostgreSQL schema (dropped afterwards): (database URL, schema name)."""
    namespace = f"ap_part_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(schema)
    await admin.execute(f"CREATE SCHEMA {namespace}")
    try:
        yield schema, namespace
    finally:
        await admin.execute(f"DROP SCHEMA {namespace} CASCADE")  # our own throwaway schema only
        await admin.close()


async def connect(scratch: tuple[str, str]) -> asyncpg.Connection:
    url, namespace = scratch
    return await asyncpg.connect(url, server_settings={"search_path": namespace, "timezone": "UTC"})


def months_back(count: int) -> list[date]:
    months = [month_start(TODAY)]
    while len(months) < count:
        previous = months[-1] - timedelta(days=1)
        months.append(month_start(previous))
    return months


def day_of(key: tuple[Any, ...]) -> date:
    """The day of a pg_counters key (hourly keys hold a datetime)."""
    return key[2].date() if isinstance(key[2], datetime) else key[2]


def unit_for(day: date, seed: int) -> list[StagedBucket]:
    """A day's daily, two hourly and per-user buckets (never in the future)."""
    hours = [min(datetime(day.year, day.month, day.day, h, tzinfo=UTC), NOW) for h in (0, 23)]
    return [StagedBucket(BucketRef("d", day_bucket(day)), {"view": 3 + seed, "buy": 1}),
            *(StagedBucket(BucketRef("h", hour_bucket(hour)), {"view": 1 + seed + n}) for n, hour in enumerate(hours)),
            StagedBucket(BucketRef("u", day_bucket(day)), {user_field("view", f"u{seed % 5}"): 2,
                                                             user_field("buy", f"u{seed % 3}"): 1,
                                                             user_field("view", "everyone"): 1})]


async def fill(conn: asyncpg.Connection, months: int = 14) -> None:
    """Both pipelines, through the flusher's own apply_unit: two days in each of ``months`` months."""
    seed = 0
    for month in months_back(months):
        for day in (month, min(month + timedelta(days=14), TODAY)):
            for pipeline in PIPELINES:
                seed += 1
                assert (await apply_unit(conn, pipeline, f"fill-{seed:05d}", unit_for(day, seed))).applied


_SNAPSHOT = {
    "analytics_daily": "pipeline, event_type, day",
    "analytics_hourly": "pipeline, event_type, hour",
    "analytics_user_daily": "pipeline, day, user_id, event_type",
    "analytics_daily_uniques": "pipeline, event_type, day",
    "analytics_user_last_seen": "pipeline, event_type, user_id",
    "analytics_flush_ledger": "pipeline, unit_id",
}


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, every column (updated_at included), in key order."""
    return {table: [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY {key}")]
            for table, key in _SNAPSHOT.items()}


async def test_migrate_converts_an_unpartitioned_database_losing_nothing(scratch: tuple[str, str]) -> None:
    """A database created and filled by the schema of before (frozen copy) over 14 months: migrate converts
    the three counter tables in place, every row and every total equal, rollups exact; a re-run is a
    no-op; the flusher then upserts into the partitioned tables (ON CONFLICT adds)."""
    conn = await connect(scratch)
    try:
        await conn.execute(FROZEN_SCHEMA)
        await fill(conn)
        before = await snapshot(conn)
        totals = {table: await conn.fetchval(f"SELECT sum(count) FROM {table}") for table in PARTITIONED}
        assert all(before.values()) and all(totals.values())

        changes = await apply_schema(conn)
        assert sorted(name for kind, name in changes if kind == "partitioned") == sorted(PARTITIONED)
        assert await relkinds(conn, PARTITIONED) == dict.fromkeys(PARTITIONED, "p")
        assert await snapshot(conn) == before
        assert {table: await conn.fetchval(f"SELECT sum(count) FROM {table}") for table in PARTITIONED} == totals
        assert not await relkinds(conn, [f"{table}_unpartitioned" for table in PARTITIONED])
        months = set(months_back(14)) | {month for _, month in months_ahead(TODAY)}
        assert set(await existing_partitions(conn)) == {(table, month) for table in PARTITIONED for month in months}
        # each row sits in its own month's partition (and the parents hold no rows of their own)
        for table, column in PARTITIONED.items():
            utc = f"({column} AT TIME ZONE 'UTC')" if column == "hour" else column
            misplaced = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE tableoid::regclass::text <> "
                f"'{table}_p' || to_char(date_trunc('month', {utc}), 'YYYYMM')")
            assert misplaced == 0, table
        # the keys and the dashboard indexes are there, named as schema.sql names them
        indexes = {row["indexname"] for row in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = ANY($2::text[])",
            scratch[1], list(PARTITIONED))}
        assert indexes == {"analytics_daily_pkey", "analytics_daily_pipeline_day", "analytics_hourly_pkey",
                           "analytics_hourly_pipeline_hour", "analytics_user_daily_pkey"}
        for pipeline in PIPELINES:
            await assert_rollups_exact(conn, pipeline)
        assert await apply_schema(conn) == []  # idempotent: nothing to do, nothing re-run

        # the unchanged protocol on the partitioned tables: re-applying a unit adds, the ledger still guards
        counts = await pg_counters(conn, PIPELINES[0])
        unit = unit_for(months_back(14)[-1], 1)
        assert (await apply_unit(conn, PIPELINES[0], "after-00001", unit)).applied
        assert not (await apply_unit(conn, PIPELINES[0], "after-00001", unit)).applied
        after = await pg_counters(conn, PIPELINES[0])
        assert sum(after.values()) - sum(counts.values()) == sum(sum(b.counts.values()) for b in unit)
        await assert_rollups_exact(conn, PIPELINES[0])
    finally:
        await conn.close()


async def test_a_failed_conversion_leaves_the_old_layout_whole(scratch: tuple[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion is one transaction: failing after one table was moved keeps every table as it was."""
    conn = await connect(scratch)
    try:
        await conn.execute(FROZEN_SCHEMA)
        await fill(conn, months=3)
        before = await snapshot(conn)
        real_move = migrate._move_rows
        moved: list[str] = []

        async def move_then_fail(conn: asyncpg.Connection, table: str, old: str) -> int:
            if moved:
                raise RuntimeError("simulated crash in the middle of the conversion")
            moved.append(table)
            return await real_move(conn, table, old)

        monkeypatch.setattr(migrate, "_move_rows", move_then_fail)
        with pytest.raises(RuntimeError):
            await apply_schema(conn)
        assert moved  # one table had been moved when it failed
        assert await relkinds(conn, PARTITIONED) == dict.fromkeys(PARTITIONED, "r")
        assert await snapshot(conn) == before
        monkeypatch.setattr(migrate, "_move_rows", real_move)
        assert len([kind for kind, _ in await apply_schema(conn) if kind == "partitioned"]) == 3
        assert await snapshot(conn) == before
    finally:
        await conn.close()


async def test_partitions_created_on_demand_and_by_racing_creators(scratch: tuple[str, str]) -> None:
    """A unit of a month without a partition (a late or old timestamp) gets it created before it applies;
    four connections creating the same missing partitions at once: each created once, no error."""
    conn = await connect(scratch)
    others = [await connect(scratch) for _ in range(4)]
    try:
        await apply_schema(conn)
        old = month_start(TODAY - timedelta(days=200))
        assert partition_name("analytics_user_daily", old) not in await relkinds(
            conn, [partition_name(t, old) for t in PARTITIONED])
        assert (await apply_unit(conn, PIPELINES[0], "late-00001", unit_for(old + timedelta(days=3), 1))).applied
        assert {(t, old) for t in PARTITIONED} <= set(await existing_partitions(conn))

        far = [(table, date(2001, month, 1)) for table in PARTITIONED for month in (1, 2, 3)]
        created = await asyncio.gather(*(ensure_partitions(other, far) for other in others))
        assert sorted(name for names in created for name in names) == sorted(partition_name(t, m) for t, m in far)
        assert await asyncio.gather(*(ensure_partitions(other, far) for other in others)) == [[], [], [], []]
        # the schema's lock key is the one partitions.py serialises on
        assert f"pg_advisory_xact_lock({SCHEMA_LOCK_KEY})" in migrate.schema_sql()
        # no DEFAULT partition: a row of a month without a partition is refused, never parked somewhere
        with pytest.raises(asyncpg.exceptions.CheckViolationError):
            await conn.execute("INSERT INTO analytics_daily (pipeline, event_type, day, count) "
                               "VALUES ('t/x', 'e', '1999-01-01', 1)")
    finally:
        for other in others:
            await other.close()
        await conn.close()


async def test_retention_drops_a_partition_only_past_every_pipelines_retention(scratch: tuple[str, str]) -> None:
    """Pipelines a (30 days) and b (400 days) share an old month: a's retention deletes its own rows there
    one by one and keeps the partition for b; once b's retention is 30 days too, the partition is dropped
    whole. A pipeline whose retention was never recorded keeps a partition too. Rollups stay exact."""
    conn = await connect(scratch)
    try:
        await apply_schema(conn)
        old_day = TODAY - timedelta(days=100)
        old, recent = month_start(old_day), TODAY - timedelta(days=2)
        assert next_month(old) <= TODAY - timedelta(days=30)
        for n, pipeline in enumerate(PIPELINES):
            for day in (old_day, recent):
                assert (await apply_unit(conn, pipeline, f"r-{n}-{day:%Y%m%d}", unit_for(day, n))).applied
        old_parts = {partition_name(t, old) for t in PARTITIONED}
        a, b = PIPELINES
        a_old_rows = sum([await conn.fetchval(f"SELECT count(*) FROM {name} WHERE pipeline = $1", a)
                          for name in old_parts])

        assert await apply_retention(conn, b, 400, []) == 0
        assert await apply_retention(conn, a, 30, []) == a_old_rows  # deleted row by row
        assert old_parts <= set(await relkinds(conn, old_parts))  # kept: b holds rows there, keeping 400 days
        assert all(day_of(key) >= TODAY - timedelta(days=30) for key in await pg_counters(conn, a))
        b_counts = await pg_counters(conn, b)
        assert any(day_of(key) == old_day for key in b_counts)

        # an unrecorded pipeline's rows also keep a partition past everyone else's retention
        await conn.execute("INSERT INTO analytics_daily (pipeline, event_type, day, count) "
                           "VALUES ('t/never', 'e', $1, 1)", old_day)
        b_old_rows = sum([await conn.fetchval(f"SELECT count(*) FROM {name} WHERE pipeline = $1", b)
                          for name in old_parts])
        assert await apply_retention(conn, b, 30, []) == b_old_rows
        gone = old_parts - set(await relkinds(conn, old_parts))
        assert gone == {partition_name("analytics_hourly", old), partition_name("analytics_user_daily", old)}
        assert await conn.fetchval("SELECT count(*) FROM analytics_daily WHERE pipeline = 't/never'") == 1
        assert await pg_counters(conn, b) == {key: n for key, n in b_counts.items() if day_of(key) != old_day}
        for pipeline in PIPELINES:
            await assert_rollups_exact(conn, pipeline)
        await conn.execute("DELETE FROM analytics_daily WHERE pipeline = 't/never'")
        assert await apply_retention(conn, a, 30, []) == 0
        assert not set(await relkinds(conn, old_parts))  # the now empty daily partition went too
        # the month is written again (a late event): its partition comes back on demand
        assert (await apply_unit(conn, a, "late-00001", unit_for(old_day, 7))).applied
        assert old_parts <= set(await relkinds(conn, old_parts))
    finally:
        await conn.close()


async def test_retention_steps_racing_over_the_same_partition(scratch: tuple[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention steps of several pipelines at once, all entitled to drop the same old partitions: nobody
    fails (one that finds a partition gone, or its owners locked, moves on and deletes its rows one by
    one), every row goes, rollups stay exact, and what was left is dropped by the next step."""
    conns = [await connect(scratch) for _ in range(4)]
    try:
        await apply_schema(conns[0])
        old_day = TODAY - timedelta(days=100)
        pipelines = [f"test/race-{n}" for n in range(4)]
        for n, pipeline in enumerate(pipelines):
            assert (await apply_unit(conns[0], pipeline, f"race-{n}", unit_for(old_day, n))).applied
            await conns[0].execute("INSERT INTO analytics_pipeline_retention (pipeline, retention_days) "
                                   "VALUES ($1, 30)", pipeline)
        old_parts = {partition_name(t, month_start(old_day)) for t in PARTITIONED}
        deleted = await asyncio.gather(*(apply_retention(conn, pipeline, 30, [])
                                         for conn, pipeline in zip(conns, pipelines, strict=True)))
        # a partition whose owners were busy (each step holds its own pipeline's lock while it deletes
        # rows) is left for a later step; the rows are gone either way, and the next step drops it
        await apply_retention(conns[0], pipelines[0], 30, [])
        assert not set(await relkinds(conns[0], old_parts))
        # each counts its own rows in what it dropped (2 daily + 2 hourly + 3 per-user rows each): the
        # rows of the others that went with a partition are counted by nobody
        assert 7 <= sum(deleted) <= 4 * 7 and all(0 <= n <= 7 for n in deleted)
        for pipeline in pipelines:
            assert not await pg_counters(conns[0], pipeline)
            await assert_rollups_exact(conns[0], pipeline)
        # a partition listed but gone by the time it is looked at (another step dropped it): skipped
        ghost = [("analytics_daily", date(2001, 1, 1))]
        monkeypatch.setattr("analytics_pipeline.flusher.store.existing_partitions", lambda conn: _ready(ghost))
        assert await apply_retention(conns[0], pipelines[0], 30, []) == 0
    finally:
        for conn in conns:
            await conn.close()


async def _ready(value: Any) -> Any:
    return value
