"""Issue 13 end to end: a 3-shard pipeline on a real 3-master/3-replica Redis Cluster, real sidecar and
flusher processes, 16 clients posting while flushers are SIGKILLed at random: PostgreSQL's daily, hourly
and per-user totals equal exactly what the sidecars acknowledged, and the shards really sat on three
different masters. The same test runs on one plain Redis (three shards, one node) as a control.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import CounterKey, assert_rollups_exact, delete_pipeline_rows, increments, pg_counters
from support import make_config

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, key_slot, shard_tags, sidecar_shard_tag
from analytics_pipeline.core.services import RedisClusterServers, free_port

pytestmark = pytest.mark.slow

SHARDS = 3
CLIENTS = 16
TARGET_EVENTS = 4000  # acked events before the load stops (and at least KILLS flushers SIGKILLed)
KILLS = 4


def spread_pipeline(cluster: RedisClusterServers | None) -> str:
    """A fresh pipeline name whose shards sit on three different masters (on a cluster)."""
    for _ in range(200):
        name = f"test/scale-{uuid.uuid4().hex[:10]}"
        if cluster is None:
            return name
        owners = {cluster.owner_of_slot(PipelineKeys.of_tag(tag).slot)["port"] for tag in shard_tags(name, SHARDS)}
        if len(owners) == SHARDS:
            return name
    raise AssertionError("no pipeline name spread over three masters in 200 tries")


def pod_names(pipeline: str) -> list[str]:
    """One pod name per shard: sidecar k writes to shard k (core/keys.sidecar_shard_tag)."""
    tags = shard_tags(pipeline, SHARDS)
    found: dict[str, str] = {}
    for n in range(10_000):
        pod = f"web-{n}"
        found.setdefault(sidecar_shard_tag(pipeline, SHARDS, pod), pod)
        if len(found) == SHARDS:
            return [found[tag] for tag in tags]
    raise AssertionError("no pod names cover every shard")


async def _ready(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.returncode is None, f"sidecar {url} exited; see {log}"
            try:
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"sidecar {url} never became ready; see {log}")


@pytest.fixture(params=["cluster", "single"])
async def scale_redis(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> AsyncIterator[Any]:
    """(redis URL, cluster or None): a fresh 3-master cluster, or the suite's single Redis."""
    if request.param == "single":
        yield redis_url, None
        return
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    try:
        yield cluster.url, cluster
    finally:
        cluster.stop()


def _client(url: str, cluster: RedisClusterServers | None) -> aioredis.Redis | aioredis.RedisCluster:
    if cluster is not None:
        return aioredis.RedisCluster.from_url(url, decode_responses=True)
    return aioredis.Redis.from_url(url, decode_responses=True)


async def test_chaos_three_shards_exactly_once(scale_redis: Any, schema: str, tmp_path: Path) -> None:
    redis_url, cluster = scale_redis
    pipeline = spread_pipeline(cluster)
    config = make_config(pipeline, redis_url, schema, counters={"shards": SHARDS})
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(f"counters:\n  shards: {SHARDS}\nserver:\n  group_commit_window_ms: 2\n")
    base_env = {k: v for k, v in os.environ.items() if k not in ("ANALYTICS_FLUSH_FAULT",)}
    base_env.update(REDIS_URL=redis_url, DATABASE_URL=schema, ANALYTICS_PIPELINE=pipeline,
                    ANALYTICS_CONFIG=str(config_file))
    sidecars: list[tuple[asyncio.subprocess.Process, str, Path]] = []
    client = _client(redis_url, cluster)
    pg = await asyncpg.connect(schema, server_settings={"timezone": "UTC"})
    expected: Counter[CounterKey] = Counter()
    acked_events = 0
    refused = 0
    flushes: list[tuple[int, str]] = []
    kills = 0
    stop = asyncio.Event()
    slots_seen: dict[str, int] = {}
    try:
        for pod in pod_names(pipeline):
            port = free_port()
            log = tmp_path / f"sidecar-{pod}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "analytics_pipeline", "sidecar", "--port", str(port),
                    env={**base_env, "POD_NAME": pod}, stdout=out, stderr=asyncio.subprocess.STDOUT)
            sidecars.append((process, f"http://127.0.0.1:{port}", log))
        for process, url, log in sidecars:
            await _ready(url, process, log)

        now = datetime.now(UTC)

        async def post(session: aiohttp.ClientSession, number: int) -> None:
            nonlocal acked_events, refused
            local = random.Random(number)
            while not stop.is_set():
                events = [(f"e{local.randrange(4)}", f"u{local.randrange(40)}" if local.random() < 0.8 else None,
                           now - timedelta(hours=local.randrange(3))) for _ in range(local.randrange(1, 6))]
                body = [{"event": e, **({"user_id": u} if u else {}), "timestamp": t.isoformat()} for e, u, t in events]
                url = sidecars[local.randrange(len(sidecars))][1]
                try:
                    async with session.post(url + "/v1/batch", json={"batch": body}) as response:
                        answer = await response.json()
                        if response.status == 200:
                            assert answer.get("accepted") == len(events) and not answer.get("rejected"), answer
                            expected.update(increments(config, events))
                            acked_events += len(events)
                        else:
                            assert response.status == 503, (response.status, answer)
                            refused += 1
                except aiohttp.ClientError:
                    refused += 1  # no answer: the client would retry; with no ack nothing may count

        async def flusher(number: int) -> None:
            nonlocal kills
            local = random.Random(100 + number)
            while not stop.is_set():
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "analytics_pipeline", "flush", "--no-lock", "--batch-size",
                    str(local.choice([1, 3, 50])), env=base_env,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                if local.random() < 0.5:
                    await asyncio.sleep(local.uniform(0.2, 1.5))
                    if process.returncode is None:
                        process.send_signal(signal.SIGKILL)
                        kills += 1
                _, err = await process.communicate()
                flushes.append((process.returncode or 0, err.decode()[-500:]))
                if process.returncode not in (0, -signal.SIGKILL):
                    raise AssertionError(f"flush exited {process.returncode}: {err.decode()[-2000:]}")

        async def watch_slots() -> None:
            while not stop.is_set():
                for tag in shard_tags(pipeline, SHARDS):
                    dirty = PipelineKeys.of_tag(tag).dirty
                    if await client.exists(dirty):
                        slots_seen[tag] = key_slot(dirty)
                await asyncio.sleep(0.2)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS * 2),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            tasks = [asyncio.create_task(post(session, n)) for n in range(CLIENTS)]
            tasks += [asyncio.create_task(flusher(n)) for n in range(2)]
            tasks.append(asyncio.create_task(watch_slots()))
            deadline = time.monotonic() + 240
            while (acked_events < TARGET_EVENTS or kills < KILLS) and time.monotonic() < deadline:
                for task in tasks:
                    if task.done() and task.exception():
                        raise task.exception()  # type: ignore[misc]
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*tasks)
        assert acked_events >= TARGET_EVENTS and kills >= KILLS, (acked_events, kills)
        assert sum(1 for code, _ in flushes if code == 0) >= 1, flushes

        for _ in range(2):  # the final runs: recover what the killed ones left, flush the rest
            final = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "analytics_pipeline", "flush", "--no-lock", env=base_env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(final.communicate(), 120)
            assert final.returncode == 0, err.decode()[-3000:]
        summary = json.loads(out.decode().splitlines()[-1])
        assert summary["ok"] is True, summary

        assert await pg_counters(pg, pipeline) == expected
        await assert_rollups_exact(pg, pipeline)
        for tag in shard_tags(pipeline, SHARDS):
            keys = PipelineKeys.of_tag(tag)
            assert await client.zcard(keys.dirty) == 0 and await client.zcard(keys.inflight) == 0, tag
        assert len(slots_seen) == SHARDS, slots_seen  # every shard was written
        if cluster is not None:  # ... and the three shards lived on three different masters
            owners = {cluster.owner_of_slot(slot)["port"] for slot in slots_seen.values()}
            assert len(owners) == SHARDS, (owners, slots_seen)
    finally:
        for process, _, _ in sidecars:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
        await delete_pipeline_rows(pg, pipeline)
        await pg.close()
        for tag in shard_tags(pipeline, SHARDS):
            await client.srem(PIPELINES_SET, tag)
        await client.aclose()
