"""Guarantee 2 with overlap: two flushers at once (lock on, lock forced off) while writers keep writing."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, assert_clean, assert_rollups_exact, pg_counters, redis_leftovers
from support import flush_env, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.flusher.run import PipelineStats, flush_pipeline

NOW = datetime.now(UTC)


def random_batch(rng: random.Random, n: int) -> list[tuple[str, str | None, datetime]]:
    return [(f"ev{rng.randrange(4)}", f"u{rng.randrange(30)}" if rng.random() < 0.8 else None,
             NOW - timedelta(hours=rng.randrange(6))) for _ in range(n)]


async def write_for(writer: LuaWriter, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        await writer.write(random_batch(rng, rng.randrange(1, 20)))
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("use_lock", [True, False], ids=["lock", "no-lock"])
async def test_two_flushers_and_writers_concurrently(use_lock: bool, redis_url: str, redis_client: aioredis.Redis,
                                                     pg: asyncpg.Connection, config: Config, writer: LuaWriter,
                                                     keys: PipelineKeys) -> None:
    done = asyncio.Event()
    runs: list[PipelineStats] = []

    async def flusher() -> None:
        client = aioredis.Redis.from_url(redis_url)
        conn = await asyncpg.connect(config.database_url)
        try:
            while not done.is_set():
                stats = await flush_pipeline(client, conn, config, config.pipeline, batch_size=2, use_lock=use_lock)
                assert stats.error is None, stats.error
                runs.append(stats)
                await asyncio.sleep(0.002 if stats.locked else 0)
        finally:
            await client.aclose()
            await conn.close()

    flushers = [asyncio.create_task(flusher()) for _ in range(2)]
    await asyncio.gather(*(write_for(writer, 150, seed) for seed in range(3)))
    done.set()
    await asyncio.gather(*flushers)
    final = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert final.error is None
    assert sum(s.units for s in runs) > 5  # the flushers did real work while the writers ran
    if use_lock:
        assert any(s.locked for s in runs)  # they did overlap, and the lock kept one out
    else:
        assert not any(s.locked for s in runs)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))


async def test_two_flush_processes_without_lock(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    """Two real ``flush --no-lock`` processes started together, recovering each other's units, exact."""
    rng = random.Random(7)
    for _ in range(40):
        await writer.write(random_batch(rng, 30))
    env = flush_env(config)
    args = ["flush", "--no-lock", "--batch-size", "1"]
    writing = asyncio.create_task(write_for(writer, 100, 8))
    results = await asyncio.gather(run_cli_async(args, env), run_cli_async(args, env), writing)
    for code, out, err in results[:2]:
        assert code == 0, err
        assert json.loads(out.splitlines()[-1])["ok"]
    code, _, err = await run_cli_async(["flush"], env)
    assert code == 0, err
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))
