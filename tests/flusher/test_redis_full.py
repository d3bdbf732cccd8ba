"""A full or badly configured Redis: the flusher still runs and frees memory (noeviction at maxmemory),
refuses an evicting maxmemory-policy, warns where CONFIG GET is refused, and reports every Redis or
PostgreSQL failure in its JSON summary (never a traceback). Each test has a throwaway redis-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from flushkit import LuaWriter, pg_counters
from support import flush_env, make_config, run_cli_async, throwaway_redis

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.flusher.cli import check_redis_policy
from analytics_pipeline.flusher.errors import RedisMisconfigured
from analytics_pipeline.flusher.metrics import registry_for
from analytics_pipeline.flusher.run import PipelineFlush, PipelineStats
from analytics_pipeline.flusher.staging import Staging

MAXMEMORY = 4 * 1024 * 1024



@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone with a small maxmemory and the required noeviction policy."""
    with throwaway_redis(tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction") as server:
        yield server


@pytest.fixture
async def client(full_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(full_redis.url, decode_responses=True)
    yield client
    await client.aclose()


async def _fill(writer: LuaWriter) -> int:
    """Write distinct users through the sidecar's kind of script until Redis refuses even one event for
    memory (big writes first, then single events up to the brim); returns how many writes were acked."""
    now = datetime.now(UTC)
    size = 200
    for batch in range(100_000):
        try:
            await writer.write([("view", f"user-{batch}-{i:04d}-{'x' * 40}", now) for i in range(size)])
        except redis.exceptions.OutOfMemoryError:
            if size == 1:
                break
            size = 1
    else:
        raise AssertionError("Redis never filled up")
    # A refused request's own query buffer counts against maxmemory: top up with small strings until even
    # those are refused, so Redis stays over maxmemory (as after a burst) rather than at the brim.
    for pad in range(100_000):
        try:
            await writer.client.set(f"pad:{pad}", "x" * 64)
        except redis.exceptions.OutOfMemoryError:
            return batch
    raise AssertionError("Redis never filled up")


async def _used(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def test_full_redis_flush_runs_frees_memory_and_ingest_recovers(
        client: aioredis.Redis, full_redis: RedisServer, pg: asyncpg.Connection, config: Config) -> None:
    writer = LuaWriter(client, make_config(config.pipeline, full_redis.url, config.database_url))
    assert await _fill(writer) > 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):  # a plain SET NX lock would be refused now
        await client.set("probe", "x", nx=True, px=60_000)
    full = await _used(client)

    code, out, err = await run_cli_async(["flush"], flush_env(config, REDIS_URL=full_redis.url))

    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads(out.splitlines()[-1])
    assert summary["ok"] and summary["buckets"] >= 3 and summary["redis_maxmemory_policy"] == "noeviction"
    assert summary["pipelines"][config.pipeline]["lock_skipped"] is None  # the allow-oom lock was taken
    assert await pg_counters(pg, config.pipeline) == writer.expected
    assert await _used(client) < full - MAXMEMORY // 4  # the staged buckets are gone
    await writer.write([("view", "after-flush", datetime.now(UTC))])  # ingest works again


async def test_lock_refused_for_memory_still_flushes_exactly(
        client: aioredis.Redis, full_redis: RedisServer, pg: asyncpg.Connection, config: Config,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Redis refuses even the lock for memory, the run goes on without it (the ledger and the
    advisory lock keep it exact) and says so."""

    async def plain_set_nx(self: Staging, ttl_ms: int) -> str | None:  # the lock as it was: refused on OOM
        return "t" if await self.client.set(self.keys.lock, "t", nx=True, px=ttl_ms) else None

    monkeypatch.setattr(Staging, "acquire_lock", plain_set_nx)
    cfg = make_config(config.pipeline, full_redis.url, config.database_url)
    writer = LuaWriter(client, cfg)
    await _fill(writer)
    stats = await PipelineFlush(client, pg, cfg, cfg.pipeline).run()
    assert stats.error is None and stats.exit_code == 0
    assert stats.lock_skipped and "memory" in stats.lock_skipped
    assert await pg_counters(pg, cfg.pipeline) == writer.expected
    assert await client.exists(PipelineKeys(cfg.pipeline).lock) == 0


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
async def test_evicting_policy_makes_the_flusher_exit_non_zero(
        tmp_path: Path, pg: asyncpg.Connection, config: Config, policy: str) -> None:
    with throwaway_redis(tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", policy) as server:
        code, out, err = await run_cli_async(["flush"], flush_env(config, REDIS_URL=server.url))
        assert code == 2, err
        assert "Traceback" not in err
        summary = json.loads(out.splitlines()[-1])
        assert not summary["ok"] and policy in summary["error"]
        assert "maxmemory-policy noeviction" in summary["error"] and "allow_eviction" in summary["error"]

        config_file = tmp_path / "config.yaml"
        config_file.write_text("redis:\n  allow_eviction: true\n")
        env = flush_env(config, REDIS_URL=server.url, ANALYTICS_CONFIG=str(config_file))
        code, out, err = await run_cli_async(["flush"], env)
        assert code == 0, err
        assert "may be evicted" in err  # accepted, but still said


async def test_config_get_refused_is_a_warning_and_a_metric(
        tmp_path: Path, pg: asyncpg.Connection, config: Config) -> None:
    with throwaway_redis(tmp_path, "--rename-command", "CONFIG", "") as server:  # as managed Redis services do
        code, out, err = await run_cli_async(["flush"], flush_env(config, REDIS_URL=server.url))
        assert code == 0, err
        assert "cannot read Redis maxmemory-policy" in err
        assert json.loads(out.splitlines()[-1])["redis_maxmemory_policy"] is None

        client = aioredis.Redis.from_url(server.url)
        try:
            check = await check_redis_policy(client, make_config(config.pipeline, server.url, config.database_url))
        finally:
            await client.aclose()
        registry = registry_for(PipelineStats(config.pipeline), check)
        assert registry.get_sample_value("analytics_flush_redis_policy_unchecked") == 1
        assert registry.get_sample_value("analytics_flush_redis_policy_evicting") == 0


async def test_policy_check_refuses_an_evicting_redis_in_process(tmp_path: Path, config: Config) -> None:
    with throwaway_redis(tmp_path, "--maxmemory-policy", "allkeys-lfu") as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            with pytest.raises(RedisMisconfigured, match="allkeys-lfu"):
                await check_redis_policy(client, make_config(config.pipeline, server.url, config.database_url))
        finally:
            await client.aclose()


async def test_redis_permission_error_ends_in_the_json_summary(
        tmp_path: Path, pg: asyncpg.Connection, config: Config) -> None:
    """A Redis user that may not run scripts: one JSON line naming the refusal, exit 1, no traceback."""
    with throwaway_redis(tmp_path) as server:
        admin = aioredis.Redis.from_url(server.url)
        try:
            await admin.execute_command("ACL", "SETUSER", "flusher", "on", ">pw", "~*", "+@all", "-@scripting")
            await LuaWriter(admin, make_config(config.pipeline, server.url, config.database_url)).write(
                [("view", "u1", datetime.now(UTC))])
        finally:
            await admin.aclose()
        url = f"redis://flusher:pw@127.0.0.1:{server.port}/0"
        code, out, err = await run_cli_async(["flush"], flush_env(config, REDIS_URL=url))
        assert code == 1, err
        assert "Traceback" not in err
        summary = json.loads(out.splitlines()[-1])
        assert "no permissions" in summary["errors"][config.pipeline]


async def test_postgres_refusing_the_connection_ends_in_the_json_summary(
        redis_client: aioredis.Redis, config: Config) -> None:
    missing = config.database_url.rsplit("/", 1)[0] + "/no_such_database_for_this_test"
    code, out, err = await run_cli_async(["flush"], flush_env(config, DATABASE_URL=missing))
    assert code == 2, err
    assert "Traceback" not in err
    summary = json.loads(out.splitlines()[-1])
    assert not summary["ok"] and "no_such_database_for_this_test" in summary["error"]
