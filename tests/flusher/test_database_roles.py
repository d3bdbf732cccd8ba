"""The database roles docs/kubernetes.md gives (owner, writer, reader), on a real throwaway PostgreSQL: the SQL
is taken from the docs and run as written; `migrate` as the owner, a flush as the writer, and the sidecar's
queries (a real sidecar, over HTTP) as the reader, which cannot write; the writer cannot change the schema."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from support import REPO, flush_env, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import BucketRef, day_bucket, user_field
from analytics_pipeline.core.services import PostgresServer, free_port
from analytics_pipeline.flusher.partitions import PARTITIONED, month_start, partition_name, relkinds
from analytics_pipeline.flusher.staging import StagedBucket
from analytics_pipeline.flusher.store import apply_retention, apply_unit
from analytics_pipeline.sidecar.server import serve

DOCS = REPO / "docs" / "kubernetes.md"
MARKER = "-- analytics-pipeline database roles"
TABLES = ("analytics_daily", "analytics_hourly", "analytics_user_daily", "analytics_user_last_seen",
          "analytics_daily_uniques", "analytics_flush_ledger", "analytics_dead_letter",
          "analytics_dead_letter_counts", "analytics_pipeline_retention")


def documented_sql() -> tuple[str, str]:
    """The two SQL blocks of the docs' "Database roles": the roles, and the grants on existing tables."""
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    (roles,) = [block for block in blocks if block.startswith(MARKER)]
    (grants,) = [block for block in blocks if block.startswith("GRANT SELECT, INSERT")]
    return roles, grants


@pytest.fixture
def roles_pg(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL with database `analytics` and the documented roles: {role: URL}."""
    server = PostgresServer(tmp_path / "pg").start()

    async def setup() -> None:
        admin = await asyncpg.connect(server.url)
        try:
            await admin.execute("CREATE DATABASE analytics")
        finally:
            await admin.close()
        admin = await asyncpg.connect(server.url.rsplit("/", 1)[0] + "/analytics")
        try:
            await admin.execute(documented_sql()[0])
        finally:
            await admin.close()

    try:
        asyncio.run(setup())
        yield {role: f"postgresql://analytics_{role}:{role}-secret@127.0.0.1:{server.port}/analytics"
               for role in ("owner", "writer", "reader")}
    finally:
        server.destroy()


def test_the_docs_name_every_table_of_the_schema() -> None:
    schema = (REPO / "schema.sql").read_text(encoding="utf-8")
    created = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema))
    assert created == set(TABLES)
    _, grants = documented_sql()
    assert all(table in grants for table in TABLES)


async def counts(session: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with session.get(f"{base}/v1/counts", params={"event": "view"}) as answer:
        assert answer.status == 200, await answer.text()
        body = await answer.json()
    async with session.get(f"{base}/v1/uniques") as answer:
        assert answer.status == 200, await answer.text()
        uniques = await answer.json()
    async with session.get(f"{base}/v1/events") as answer:
        assert answer.status == 200, await answer.text()
    return {"total": body["total"], "uniques": sum(point.get("count", point.get("users", 0)) or 0
                                                   for point in uniques.get("series", []))}


async def test_owner_migrates_writer_flushes_reader_queries_and_cannot_write(
        roles_pg: dict[str, str], config: Config, redis_client: aioredis.Redis) -> None:
    owner = config.replace(database_url=roles_pg["owner"])
    code, _, err = await run_cli_async(["migrate"], flush_env(owner))
    assert code == 0, err
    writer = config.replace(database_url=roles_pg["writer"])
    conn = await asyncpg.connect(roles_pg["writer"])
    try:  # rows, not the schema
        for statement in ("CREATE TABLE analytics_evil (x int)", "DROP TABLE analytics_flush_ledger",
                          "ALTER TABLE analytics_daily ADD COLUMN evil int"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()

    port = free_port()
    reader = config.replace(database_url=roles_pg["reader"], server={**config.as_dict()["server"], "port": port})
    stop = asyncio.Event()
    sidecar = asyncio.create_task(serve(reader, stop=stop))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.post(f"{base}/v1/events", json=[
                            {"event": "view", "user_id": "alice"}, {"event": "view", "user_id": "bob"},
                            {"event": "view", "user_id": "alice"}]) as answer:
                        assert 200 <= answer.status < 300, await answer.text()
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            before = await counts(session, base)  # PostgreSQL (empty) read as the reader + Redis
            assert before["total"] == 3

            code, _, err = await run_cli_async(["flush"], flush_env(writer))
            assert code == 0, err
            after = await counts(session, base)  # now the totals come from PostgreSQL, read as the reader
            assert after == before
    finally:
        stop.set()
        assert await asyncio.wait_for(sidecar, 30) == 0

    conn = await asyncpg.connect(roles_pg["reader"])
    try:
        assert await conn.fetchval("SELECT sum(count) FROM analytics_daily WHERE pipeline = $1", config.pipeline) == 3
        for statement in ("INSERT INTO analytics_daily (pipeline, event_type, day, count) "
                          "VALUES ('x/y', 'e', current_date, 1)",
                          "UPDATE analytics_daily SET count = 0", "DELETE FROM analytics_flush_ledger",
                          "CREATE TABLE analytics_evil (x int)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_writer_creates_partitions_through_the_function_and_owner_drops_them(
        roles_pg: dict[str, str], config: Config) -> None:
    """Partitioning with the documented roles: the writer (no DDL right) gets an old month's partitions created
    through analytics_create_month_partition when it writes there; its retention cannot DROP them (it deletes
    its rows one by one instead); retention run as the owner drops the whole partitions."""
    code, _, err = await run_cli_async(["migrate"], flush_env(config.replace(database_url=roles_pg["owner"])))
    assert code == 0, err
    old_day = datetime.now(UTC).date() - timedelta(days=100)
    names = [partition_name(table, month_start(old_day)) for table in PARTITIONED]
    unit = [StagedBucket(BucketRef("d", day_bucket(old_day)), {"view": 2}),
            StagedBucket(BucketRef("u", day_bucket(old_day)), {user_field("view", "ann"): 2})]
    writer = await asyncpg.connect(roles_pg["writer"], server_settings={"timezone": "UTC"})
    owner = await asyncpg.connect(roles_pg["owner"], server_settings={"timezone": "UTC"})
    try:
        assert not await relkinds(writer, names)
        assert (await apply_unit(writer, config.pipeline, "old-00001", unit)).applied
        assert set(await relkinds(writer, names)) == {names[0], names[2]}  # daily and per-user: written
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute(f"DROP TABLE {names[0]}")
        assert await apply_retention(writer, config.pipeline, 30, []) == 2  # row by row
        assert set(await relkinds(writer, names)) == {names[0], names[2]}
        assert (await apply_unit(writer, config.pipeline, "old-00002", unit)).applied
        assert await apply_retention(owner, config.pipeline, 30, []) == 2  # with the partitions
        assert not await relkinds(owner, names)
        assert await owner.fetchval("SELECT count(*) FROM analytics_daily") == 0
    finally:
        await writer.close()
        await owner.close()
