"""Guarantee 2 when the services misbehave: PostgreSQL stopped mid-flush or timing out, Redis killed -9
(AOF) mid-protocol. Nothing may be lost or doubled; the next run flushes everything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, assert_clean, delete_pipeline_rows, pg_counters, redis_leftovers
from support import flush_env, make_config, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.services import PostgresServer, RedisServer
from analytics_pipeline.flusher.migrate import apply_schema
from analytics_pipeline.flusher.run import flush_pipeline

NOW = datetime.now(UTC)


def batch(n: int, salt: int = 1) -> list[tuple[str, str | None, datetime]]:
    return [(f"ev{(i + salt) % 3}", f"u{(i * salt) % 5}", NOW - timedelta(hours=i % 3)) for i in range(n)]


@pytest.fixture
def throwaway_pg(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path / "pg").start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


async def test_postgres_stopped_mid_flush_loses_nothing(throwaway_pg: PostgresServer, redis_client: aioredis.Redis,
                                                        config: Config, keys: PipelineKeys) -> None:
    cfg = make_config(config.pipeline, config.redis_url, throwaway_pg.url)
    conn = await asyncpg.connect(cfg.database_url)
    await apply_schema(conn)
    writer = LuaWriter(redis_client, cfg)
    await writer.write(batch(40))

    async def stop_postgres(step: str) -> None:
        if step == "after_claim":  # "fast": the harness runs with synchronous_commit=off, so an immediate
            await asyncio.to_thread(throwaway_pg.stop, "fast")  # stop could drop commits PostgreSQL acked

    stats = await flush_pipeline(redis_client, conn, cfg, cfg.pipeline, hook=stop_postgres)
    conn.terminate()
    assert stats.exit_code == 2 and stats.error and stats.error.startswith("PostgreSQL unreachable"), stats.error
    assert await redis_client.zcard(keys.inflight) == 1  # the claimed unit waits for the next run
    await writer.write(batch(10, 2))

    # the command, while PostgreSQL is down: exit 2, one-line reason, nothing claimed
    code, out, err = await run_cli_async(["flush"], flush_env(cfg))
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("analytics-pipeline flush: error: PostgreSQL unreachable")
    assert json.loads(out.splitlines()[-1])["ok"] is False
    assert await redis_client.zcard(keys.inflight) == 1

    await asyncio.to_thread(throwaway_pg.start)
    code, out, err = await run_cli_async(["flush"], flush_env(cfg))
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["recovered_runs"] == 1
    conn = await asyncpg.connect(cfg.database_url, server_settings={"timezone": "UTC"})
    try:
        assert await pg_counters(conn, cfg.pipeline) == writer.expected
    finally:
        await conn.close()
    assert_clean(await redis_leftovers(redis_client, keys))
    await redis_client.srem(PIPELINES_SET, cfg.pipeline)


async def test_postgres_statement_timeout_then_exact(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                     config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    """A row lock held elsewhere makes the upsert time out: the run fails cleanly and the next one is exact."""
    await writer.write(batch(20))
    assert (await flush_pipeline(redis_client, pg, config, config.pipeline)).error is None
    slow = make_config(config.pipeline, config.redis_url, config.database_url,
                       flush={"statement_timeout_seconds": 0.5})
    await writer.write(batch(20))
    blocker = await asyncpg.connect(config.database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("SELECT 1 FROM analytics_daily WHERE pipeline = $1 FOR UPDATE", config.pipeline)
        from analytics_pipeline.core.postgres import connect

        conn = await connect(slow)
        try:
            stats = await flush_pipeline(redis_client, conn, slow, config.pipeline)
        finally:
            await conn.close()
        assert stats.exit_code == 2 and stats.error and "QueryCanceled" in stats.error, stats.error
        await blocking.rollback()
    finally:
        await blocker.close()
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert stats.error is None and stats.recovered_runs == 1
    assert await pg_counters(pg, config.pipeline) == writer.expected
    assert_clean(await redis_leftovers(redis_client, keys))


@pytest.mark.parametrize("step", ["after_claim", "in_transaction", "after_commit", "after_cleanup"])
async def test_redis_killed_and_restarted_from_aof(step: str, aof_redis: RedisServer, pg: asyncpg.Connection,
                                                   config: Config, keys: PipelineKeys) -> None:
    cfg = make_config(config.pipeline, aof_redis.url, config.database_url)
    client = aioredis.Redis.from_url(cfg.redis_url, decode_responses=True)
    writer = LuaWriter(client, cfg)
    try:
        await writer.write(batch(50))
        crashed = False

        async def crash_redis(name: str) -> None:
            nonlocal crashed
            if name == step and not crashed:
                crashed = True
                await asyncio.to_thread(aof_redis.kill)
                await asyncio.to_thread(aof_redis.start)

        await flush_pipeline(client, pg, cfg, cfg.pipeline, batch_size=2, hook=crash_redis)
        assert crashed
        await writer.write(batch(10, 2))
        await asyncio.to_thread(aof_redis.kill)  # once more, between runs
        await asyncio.to_thread(aof_redis.start)
        await client.aclose()  # a new run is a new process: fresh connections
        client = aioredis.Redis.from_url(cfg.redis_url, decode_responses=True)
        stats = await flush_pipeline(client, pg, cfg, cfg.pipeline, use_lock=False)
        assert stats.error is None, stats.error
        assert await pg_counters(pg, cfg.pipeline) == writer.expected
        assert_clean(await redis_leftovers(client, keys))
    finally:
        await client.aclose()
        await delete_pipeline_rows(pg, cfg.pipeline)
