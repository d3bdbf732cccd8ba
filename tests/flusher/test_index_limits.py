"""The config's byte limits are what PostgreSQL can index: the largest event name and user id the config
allows, in the longest pipeline name, flush into every table (no unit can be poisoned by its size)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, assert_clean, pg_counters, redis_leftovers

from analytics_pipeline.core.config import INDEX_KEY_BUDGET_BYTES, MAX_PIPELINE_BYTES, Config, parse_config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.flusher.run import flush_pipeline

LONGEST = f"n{uuid.uuid4().hex}".ljust(63, "n") + "/" + f"p{uuid.uuid4().hex}".ljust(253, "p")


def incompressible(size: int, rng: random.Random) -> str:
    """``size`` UTF-8 bytes of random CJK (3 bytes each, printable) that pglz cannot shrink."""
    text = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(size // 3))
    return text + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(size % 3))


@pytest.mark.parametrize("pipeline", [LONGEST])
async def test_largest_allowed_name_and_id_flush_into_every_table(
        pipeline: str, redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config,
        keys: PipelineKeys) -> None:
    assert len(pipeline.encode()) == MAX_PIPELINE_BYTES
    name_bytes = 128
    limits = parse_config({**config.as_dict(), "ingest": {"max_name_length": name_bytes,
                                                          "max_id_length": INDEX_KEY_BUDGET_BYTES - name_bytes}})
    rng = random.Random(11)
    name = incompressible(name_bytes, rng)
    users = [incompressible(limits.ingest.max_id_length, rng) for _ in range(3)]
    assert {len(user.encode()) for user in users} == {2216}
    writer = LuaWriter(redis_client, limits)
    try:
        await writer.write([(name, user, datetime.now(UTC)) for user in users])
        stats = await flush_pipeline(redis_client, pg, limits, pipeline)
        assert stats.error is None, stats.error
        assert await pg_counters(pg, pipeline) == writer.expected
        assert await pg.fetchval("SELECT count(*) FROM analytics_user_last_seen WHERE pipeline = $1", pipeline) == 6
        assert_clean(await redis_leftovers(redis_client, keys))
    finally:
        await redis_client.srem(PIPELINES_SET, pipeline)
