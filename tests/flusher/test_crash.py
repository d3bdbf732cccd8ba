"""Guarantee 2 under crashes: the flusher process SIGKILLed after every protocol step, then a normal run.

Each test runs the real command (``python -m analytics_pipeline flush``) as a subprocess with
``ANALYTICS_FLUSH_FAULT=<step>[:n]`` so it dies mid-protocol with no cleanup whatsoever.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, assert_clean, assert_rollups_exact, pg_counters, redis_leftovers
from support import flush_env, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.flusher.faults import STEPS

NOW = datetime.now(UTC)

# faults that leave a unit in flight (claimed, maybe committed, not cleaned up)
LEAVES_UNIT = {"after_claim", "after_read", "in_transaction", "after_commit", "after_claim:2", "in_transaction:2",
               "after_commit:3"}


def batch(n: int, salt: int) -> list[tuple[str, str | None, datetime]]:
    return [(f"ev{(i + salt) % 3}", f"u{(i * salt) % 7}", NOW - timedelta(hours=i % 4)) for i in range(n)]


@pytest.mark.parametrize("fault", [*STEPS, "after_claim:2", "in_transaction:2", "after_commit:3"])
async def test_sigkill_at_every_step_then_exact(fault: str, redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    await writer.write(batch(60, 1))
    code, out, err = await run_cli_async(["flush", "--batch-size", "2"], flush_env(config, ANALYTICS_FLUSH_FAULT=fault))
    assert code == -signal.SIGKILL, (code, out, err)
    assert out == ""  # died before printing anything
    inflight = await redis_client.zrange(keys.inflight, 0, -1)
    assert bool(inflight) == (fault in LEAVES_UNIT), inflight
    if fault.startswith("after_commit"):  # committed but not cleaned up: PostgreSQL has it, Redis still too
        assert await pg.fetchval("SELECT count(*) FROM analytics_flush_ledger WHERE unit_id = $1", inflight[0]) == 1
    if fault.startswith("in_transaction"):  # killed before COMMIT: the unit is not in the ledger
        assert await pg.fetchval("SELECT count(*) FROM analytics_flush_ledger WHERE unit_id = $1", inflight[0]) == 0

    await writer.write(batch(25, 2))  # traffic keeps arriving between the crash and the next run
    # the dead run's lock lives on until its TTL: a locked run skips, exit 0, and says so
    code, out, _ = await run_cli_async(["flush"], flush_env(config))
    assert code == 0 and json.loads(out.splitlines()[-1])["locked_pipelines"] == [config.pipeline]
    code, out, err = await run_cli_async(["flush", "--no-lock", "--batch-size", "2"], flush_env(config))
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["ok"] and summary["recovered_runs"] == (1 if fault in LEAVES_UNIT else 0)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))


async def test_repeated_crashes_in_recovery_still_exact(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                        config: Config, writer: LuaWriter,
                                                        keys: PipelineKeys) -> None:
    """Recovery itself is killed (after committing the recovered unit, before cleanup), twice over."""
    await writer.write(batch(30, 3))
    env = flush_env(config, ANALYTICS_FLUSH_FAULT="in_transaction")
    assert (await run_cli_async(["flush", "--no-lock"], env))[0] == -signal.SIGKILL
    for _ in range(2):  # the first after_commit is the recovered unit's
        env = flush_env(config, ANALYTICS_FLUSH_FAULT="after_commit")
        assert (await run_cli_async(["flush", "--no-lock"], env))[0] == -signal.SIGKILL
    code, out, err = await run_cli_async(["flush", "--no-lock"], flush_env(config))
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["recovered_runs"] == 1 and summary["pipelines"][config.pipeline]["skipped_units"] == 1
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))
