"""Issue 11 case 3: a unit that keeps failing is set aside (dead letter) after N runs, so later units flow;
`deadletter retry` applies it exactly once (also when killed mid-way), `discard` removes it."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from flushkit import LuaWriter, assert_clean, assert_rollups_exact, pg_counters, redis_leftovers
from support import flush_env, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.flusher import deadletter
from analytics_pipeline.flusher.run import flush_pipeline

NOW = datetime.now(UTC)
# 2,000 CJK characters: 6,000 bytes, more than a B-tree row can hold (the sidecar now refuses it: this
# writes to Redis directly, as an older sidecar or a hand-made key could have).
POISON_USER = "".join(chr(0x4E00 + (n * 7919) % 20000) for n in range(2000))


def good(n: int, salt: str) -> list[tuple[str, str | None, datetime]]:
    return [(f"ev{i % 3}", f"{salt}-u{i % 4}", NOW - timedelta(days=1 + i % 2)) for i in range(n)]


@pytest.fixture
async def blocked_event(pg: asyncpg.Connection, pipeline: str) -> AsyncIterator[str]:
    """A trigger that makes PostgreSQL refuse this pipeline's daily rows of event 'blocked' (P0001)."""
    function = "ap_test_block_" + pipeline.replace("/", "_").replace("-", "_")
    await pg.execute(f"""
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.pipeline = '{pipeline}' AND NEW.event_type = 'blocked' THEN
                RAISE EXCEPTION 'event type blocked by a test trigger';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {function} BEFORE INSERT ON analytics_daily FOR EACH ROW EXECUTE FUNCTION {function}();
    """)
    try:
        yield function
    finally:
        await pg.execute(f"DROP TRIGGER IF EXISTS {function} ON analytics_daily; DROP FUNCTION IF EXISTS {function}()")


async def test_poison_unit_is_set_aside_after_n_runs_and_later_units_flow(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, keys: PipelineKeys) -> None:
    config = config.replace(flush={"dead_letter_after_failures": 3})
    writer = LuaWriter(redis_client, config)
    await writer.write([*good(20, "a"), ("page_view", POISON_USER, NOW)])
    poisoned = Counter(writer.expected)
    for run in (1, 2):
        stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
        assert stats.error is not None and f"({run} of 3 runs before it is set aside" in stats.error
        assert "index row size" in stats.error
        assert stats.exit_code == 1 and stats.dead_lettered_units == 0
        assert await pg_counters(pg, config.pipeline) == Counter()
        await writer.write(good(10, f"later{run}"))  # waits behind the poisoned unit
    later = writer.expected - poisoned

    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert stats.error is None and stats.exit_code == 0
    assert (stats.dead_lettered_units, stats.dead_letter_units) == (1, 1)
    assert await pg_counters(pg, config.pipeline) == later  # everything after the poisoned unit flowed
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))
    assert await redis_client.hlen(keys.unit_failures) == 0
    [dead] = await deadletter.pending(pg, config.pipeline)
    assert dead.failures == 3 and "index row size" in dead.error and dead.counters == len(poisoned)

    # the next runs go on normally and keep saying a dead letter waits
    await writer.write(good(5, "after"))
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert (stats.error, stats.units, stats.dead_letter_units) == (None, 1, 1)
    assert await pg_counters(pg, config.pipeline) == writer.expected - poisoned

    # it cannot be applied (the value is too long for any index): discard it, once
    env = flush_env(config)
    code, out, _ = await run_cli_async(["deadletter", "retry", dead.unit_id], env)
    assert code == 1 and orjson.loads(out)["result"] == "failed" and "index row size" in out
    assert len(await deadletter.pending(pg, config.pipeline)) == 1  # a failed retry changes nothing
    code, out, _ = await run_cli_async(["deadletter", "discard", dead.unit_id], env)
    assert code == 0 and orjson.loads(out)["result"] == "discarded"
    code, out, _ = await run_cli_async(["deadletter", "discard", dead.unit_id], env)
    assert code == 4 and orjson.loads(out)["result"] == "not_found"
    assert await deadletter.pending(pg, config.pipeline) == []
    assert await pg.fetchval("SELECT count(*) FROM analytics_dead_letter_counts WHERE pipeline = $1",
                             config.pipeline) == 0
    assert await pg_counters(pg, config.pipeline) == writer.expected - poisoned


async def test_retry_applies_a_dead_letter_exactly_once_even_when_killed(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, keys: PipelineKeys,
        blocked_event: str, tmp_path: Path) -> None:
    config = config.replace(flush={"dead_letter_after_failures": 1})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_file_dict()), encoding="utf-8")
    writer = LuaWriter(redis_client, config)
    await writer.write([*good(30, "a"), ("blocked", "u1", NOW), ("blocked", "u2", NOW)])
    env = flush_env(config, ANALYTICS_CONFIG=str(config_file))
    code, out, err = await run_cli_async(["flush"], env)
    summary = orjson.loads(out.splitlines()[-1])
    assert code == 3, err  # flushed, but a dead letter waits: the CronJob's Job fails, the operator warns
    assert (summary["ok"], summary["dead_lettered_units"], summary["dead_letter_units"]) == (True, 1, 1)
    assert summary["pipelines"][config.pipeline]["dead_letter_units"] == 1
    assert "deadletter list" in err
    assert await pg_counters(pg, config.pipeline) == Counter()
    code, out, _ = await run_cli_async(["deadletter", "list"], env)
    [listed] = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0 and "blocked by a test trigger" in listed["error"] and listed["pipeline"] == config.pipeline

    await pg.execute(f"DROP TRIGGER {blocked_event} ON analytics_daily")  # the cause is fixed
    killed = {**env, "ANALYTICS_FLUSH_FAULT": "in_transaction"}
    assert (await run_cli_async(["deadletter", "retry", listed["unit_id"]], killed))[0] == -signal.SIGKILL
    assert await pg_counters(pg, config.pipeline) == Counter()  # nothing of it committed
    assert len(await deadletter.pending(pg, config.pipeline)) == 1

    code, out, _ = await run_cli_async(["deadletter", "retry", "--every"], env)
    assert code == 0 and orjson.loads(out)["result"] == "applied"
    code, out, _ = await run_cli_async(["deadletter", "retry", listed["unit_id"]], env)
    assert code == 4 and orjson.loads(out)["result"] == "not_found"
    assert await pg_counters(pg, config.pipeline) == writer.expected  # exactly once
    await assert_rollups_exact(pg, config.pipeline)
    code, out, _ = await run_cli_async(["flush"], env)
    assert code == 0 and orjson.loads(out.splitlines()[-1])["dead_letter_units"] == 0
    assert_clean(await redis_leftovers(redis_client, keys))


async def test_failures_that_are_not_the_units_fault_are_not_counted() -> None:
    import asyncpg.exceptions as pgerr
    import redis.exceptions as rerr

    assert deadletter.is_unit_failure(pgerr.ProgramLimitExceededError("index row size 6040 exceeds ..."))
    assert deadletter.is_unit_failure(pgerr.RaiseError("from a trigger"))
    assert deadletter.is_unit_failure(ValueError("invalid literal for int()"))
    assert not deadletter.is_unit_failure(pgerr.UndefinedTableError("relation does not exist"))
    assert not deadletter.is_unit_failure(pgerr.DiskFullError("no space left"))
    assert not deadletter.is_unit_failure(ConnectionRefusedError())
    assert not deadletter.is_unit_failure(rerr.ConnectionError("gone"))
    assert not deadletter.is_unit_failure(rerr.OutOfMemoryError("OOM command not allowed"))
