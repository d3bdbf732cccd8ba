"""The sidecar keeps Redis headroom and refuses an evicting Redis (each test has a throwaway redis-server).

Headroom: above ``redis.memory_high_water_ratio`` of ``maxmemory`` ingest answers 503 (Retry-After,
JSON) while Redis itself would still take writes, so the flusher can always run; after a flush frees
memory, ingest takes events again and PostgreSQL holds exactly what was acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from sidecar_helpers import Answer, Sidecar, SidecarFactory
from support import flush_env, run_cli_async, throwaway_redis

from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.flusher.migrate import apply_schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flusher"))

from flushkit import delete_pipeline_rows, increments, pg_counters

MAXMEMORY = 8 * 1024 * 1024
FAST = {"memory_check_interval_seconds": 0.05}



@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with throwaway_redis(tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction") as server:
        yield server


async def _until(check, what: str, limit_s: float = 30.0) -> Answer:  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns an answer (not None): waits for a state, asserts no duration."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        answer = await check()
        if answer is not None:
            return answer
        assert asyncio.get_running_loop().time() < deadline, f"never saw: {what}"
        await asyncio.sleep(0.05)


def _events(batch: int, now: datetime) -> list[dict[str, str]]:
    return [{"event": "view", "user_id": f"user-{batch}-{i:03d}-{'x' * 40}", "timestamp": now.isoformat()}
            for i in range(200)]


async def test_full_redis_sheds_load_before_redis_refuses_and_recovers_after_a_flush(
        start_sidecar: SidecarFactory, sidecar_config, small_redis: RedisServer, database_url: str) -> None:
    config = sidecar_config(redis_url=small_redis.url, redis=FAST)
    sidecar = await start_sidecar(config)
    client = aioredis.Redis.from_url(small_redis.url, decode_responses=True)
    conn = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    await apply_schema(conn)
    try:
        acked: Counter = Counter()
        now = datetime.now(UTC)
        refused = None
        for batch in range(100_000):  # until the sidecar sheds (it samples Redis every 50 ms)
            events = _events(batch, now)
            answer = await sidecar.post("/v1/events", events)
            if answer.status == 503:
                refused = answer
                break
            assert answer.status == 200, answer.body
            acked.update(increments(config, [("view", e["user_id"], now) for e in events]))
        assert refused is not None
        assert refused.body["error"] == "redis_full" and refused.headers["Retry-After"] == "1"
        assert "nothing of this request was counted" in refused.body["message"]
        ready = await sidecar.get("/readyz")
        assert ready.status == 503 and ready.body["status"] == "redis_full" and "flusher" in ready.body["reason"]
        assert await client.set("still-room", "x")  # Redis itself still takes writes: the headroom is kept
        metrics = await sidecar.get("/metrics")
        assert "analytics_sidecar_redis_memory_shedding 1.0" in metrics.body
        assert 'analytics_sidecar_requests_refused_total{reason="redis_full"}' in metrics.body

        code, out, err = await run_cli_async(["flush"], flush_env(config))
        assert code == 0, err
        assert json.loads(out.splitlines()[-1])["ok"]

        accepted = await _until(lambda: _accepted(sidecar, now), "ingest taking events again after the flush")
        assert accepted.status == 200
        assert (await sidecar.get("/readyz")).status == 200
        acked.update(increments(config, [("view", "after-flush", now)]))
        code, out, err = await run_cli_async(["flush"], flush_env(config))
        assert code == 0, err
        assert await pg_counters(conn, config.pipeline) == acked
    finally:
        await delete_pipeline_rows(conn, config.pipeline)
        await conn.close()
        await client.aclose()


async def _accepted(sidecar: Sidecar, now: datetime) -> Answer | None:
    answer = await sidecar.post("/v1/events", {"event": "view", "user_id": "after-flush",
                                               "timestamp": now.isoformat()})
    return answer if answer.status == 200 else None


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
async def test_evicting_policy_fails_readiness_with_how_to_fix(
        start_sidecar: SidecarFactory, sidecar_config, tmp_path: Path, policy: str) -> None:
    with throwaway_redis(tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", policy) as server:
        sidecar = await start_sidecar(sidecar_config(redis_url=server.url, redis=FAST))
        ready = await _until(functools.partial(_not_ready, sidecar), "readiness failing")
        assert ready.body["status"] == "misconfigured"
        assert policy in ready.body["reason"] and "maxmemory-policy noeviction" in ready.body["reason"]
        assert "redis.allow_eviction" in ready.body["reason"]
        assert "analytics_sidecar_redis_policy_evicting 1.0" in (await sidecar.get("/metrics")).body

        allowed = await start_sidecar(sidecar_config(redis_url=server.url, redis={**FAST, "allow_eviction": True}))
        await asyncio.sleep(0.2)
        assert (await allowed.get("/readyz")).status == 200


async def _not_ready(sidecar: Sidecar) -> Answer | None:
    ready = await sidecar.get("/readyz")
    return ready if ready.status == 503 else None


async def test_config_get_refused_is_a_warning_and_a_metric(
        start_sidecar: SidecarFactory, sidecar_config, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="analytics_pipeline.sidecar.redis_watch")
    with throwaway_redis(tmp_path, "--rename-command", "CONFIG", "") as server:  # as managed Redis services do
        sidecar = await start_sidecar(sidecar_config(redis_url=server.url, redis=FAST))

        await _until(functools.partial(_metric_set, sidecar, "analytics_sidecar_redis_policy_unchecked"),
                     "the unchecked-policy metric")
        assert (await sidecar.get("/readyz")).status == 200
        assert any("cannot read Redis maxmemory-policy" in r.getMessage() for r in caplog.records)


async def _metric_set(sidecar: Sidecar, name: str) -> Answer | None:
    metrics = await sidecar.get("/metrics")
    return metrics if f"{name} 1.0" in metrics.body else None


async def test_policy_is_read_again_on_reconnect(start_sidecar: SidecarFactory, sidecar_config,
                                                 small_redis: RedisServer) -> None:
    """A Redis that comes back with another policy (failover, restart with a new config) is judged again."""
    sidecar = await start_sidecar(sidecar_config(redis_url=small_redis.url, redis=FAST))
    assert (await sidecar.get("/readyz")).status == 200
    admin = aioredis.Redis.from_url(small_redis.url)
    try:
        await admin.config_set("maxmemory-policy", "allkeys-lru")  # a throwaway server: allowed here
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # every connection drops
    finally:
        await admin.aclose()
    ready = await _until(functools.partial(_not_ready, sidecar), "readiness failing after the reconnect")
    assert ready.body["status"] == "misconfigured" and "allkeys-lru" in ready.body["reason"]
