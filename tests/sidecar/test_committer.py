"""The group committer on its own: grouping, splitting, token clean-up, the fenced script, draining."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from sidecar_helpers import pipeline_keys

from analytics_pipeline.core.events import Event
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.committer import SCRIPT, SCRIPT_SHA, CommitFailed, GroupCommitter


def _events(count: int, name: str = "a", user: str | None = "u", message: str | None = None) -> list[Event]:
    now = datetime.now(UTC)
    return [Event(name, user, now, message) for _ in range(count)]


def _sample(committer: GroupCommitter, name: str) -> float:
    value = committer.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_requests_within_the_window_share_one_atomic_write(
        sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    committer = GroupCommitter(sidecar_config(server={"group_commit_window_ms": 50}))
    try:
        results = await asyncio.gather(*(committer.commit(_events(n + 1)) for n in range(5)))
        assert results == [0] * 5
        assert _sample(committer, "analytics_sidecar_group_commit_requests_count") == 1
        assert _sample(committer, "analytics_sidecar_group_commit_events_sum") == 15
        assert await redis_client.hget(keys.daily(datetime.now(UTC)), "a") == "15"
        assert await redis_client.hget(keys.user_daily(datetime.now(UTC)), "a\x1fu") == "15"
    finally:
        await committer.close()


async def test_batches_hold_whole_requests_up_to_max_events(sidecar_config, redis_client: aioredis.Redis,
                                                            keys: PipelineKeys) -> None:
    committer = GroupCommitter(sidecar_config(server={"group_commit_window_ms": 50, "group_commit_max_events": 3}))
    try:
        results = await asyncio.gather(*(committer.commit(_events(size)) for size in (2, 2, 2, 5)))
        assert results == [0, 0, 0, 0]
        # 2 | 2 | 2 | 5: a request is never split, an oversized one goes alone.
        assert _sample(committer, "analytics_sidecar_group_commit_requests_count") == 4
        assert _sample(committer, "analytics_sidecar_group_commit_events_sum") == 11
        assert await redis_client.hget(keys.daily(datetime.now(UTC)), "a") == "11"
    finally:
        await committer.close()


async def test_fence_tokens_of_answered_commits_are_deleted(sidecar_config, redis_client: aioredis.Redis,
                                                            keys: PipelineKeys) -> None:
    committer = GroupCommitter(sidecar_config(server={"group_commit_window_ms": 0}))
    try:
        for _ in range(6):
            await committer.commit(_events(1))
        tokens = [key for key in await pipeline_keys(redis_client, keys) if ":gc:" in key]
        assert len(tokens) == 1  # only the last one, deleted by the next commit
        assert await redis_client.get(tokens[0]) == "ok:"
        assert 0 < await redis_client.pttl(tokens[0]) <= 600_000
    finally:
        await committer.close()


async def test_script_does_nothing_when_its_token_was_fenced(sidecar_config, redis_client: aioredis.Redis,
                                                             keys: PipelineKeys) -> None:
    committer = GroupCommitter(sidecar_config())
    try:
        token = keys.group_commit("fenced-token")
        await redis_client.set(token, "fenced", px=600_000)
        loop = asyncio.get_running_loop()
        plan = committer._plan([(_events(2, message="m"), loop.create_future())], token, [])
        await redis_client.script_load(SCRIPT)
        reply = await redis_client.evalsha(SCRIPT_SHA, len(plan.keys), *plan.keys, *plan.args)
        assert reply == [0]
        assert await pipeline_keys(redis_client, keys) == [token]
        assert await redis_client.get(token) == "fenced"
        # The same plan with a fresh token applies: one dedup marker, the second event is a duplicate.
        fresh = keys.group_commit("fresh-token")
        plan = committer._plan([(_events(2, message="m"), loop.create_future())], fresh, [token])
        assert await redis_client.evalsha(SCRIPT_SHA, len(plan.keys), *plan.keys, *plan.args) == [1, 2]
        assert await redis_client.get(fresh) == "ok:2"
        assert not await redis_client.exists(token)  # listed as answered: deleted
    finally:
        await committer.close()


async def test_close_writes_what_is_pending(sidecar_config, redis_client: aioredis.Redis,
                                            keys: PipelineKeys) -> None:
    committer = GroupCommitter(sidecar_config(server={"group_commit_window_ms": 500}))
    future = committer.submit(_events(3))
    await committer.close(timeout=10)
    assert future.result() == 0
    assert await redis_client.hget(keys.daily(datetime.now(UTC)), "a") == "3"
    with pytest.raises(CommitFailed):
        committer.submit(_events(1))


async def test_too_many_pending_events_is_refused(sidecar_config) -> None:
    committer = GroupCommitter(sidecar_config(server={"group_commit_window_ms": 1000}))
    committer._max_pending_events = 5
    try:
        first = committer.submit(_events(5))
        with pytest.raises(CommitFailed) as refused:
            committer.submit(_events(1))
        assert refused.value.reason == "overloaded"
    finally:
        await committer.close()
    assert first.result() == 0


async def test_one_commit_spanning_many_hours_dirties_every_bucket(sidecar_config, redis_client: aioredis.Redis,
                                                                    keys: PipelineKeys) -> None:
    # 4,200 hours -> ~4,550 buckets in one script: more than Lua's unpack() takes in one call (8,000 values).
    hours = 4200
    committer = GroupCommitter(sidecar_config(counters={"ttl_seconds": 180 * 86400}))
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    events = [Event("e", f"u{hour}", start + timedelta(hours=hour)) for hour in range(hours)]
    try:
        assert await committer.commit(events) == 0
        assert _sample(committer, "analytics_sidecar_group_commit_requests_count") == 1
    finally:
        await committer.close()
    buckets = {key for key in await pipeline_keys(redis_client, keys) if ":h:" in key or ":d:" in key or ":u:" in key}
    days = {(start + timedelta(hours=hour)).date() for hour in range(hours)}
    assert len(buckets) == hours + 2 * len(days)
    assert set(await redis_client.zrange(keys.dirty, 0, -1)) == buckets
    async with redis_client.pipeline(transaction=False) as pipe:
        for key in sorted(buckets):
            pipe.ttl(key)
        assert all(0 < ttl <= 180 * 86400 for ttl in await pipe.execute())
    async with redis_client.pipeline(transaction=False) as pipe:
        for hour in range(hours):
            pipe.hget(keys.hourly(start + timedelta(hours=hour)), "e")
        assert await pipe.execute() == ["1"] * hours


async def test_script_keys_share_one_redis_cluster_slot(sidecar_config) -> None:
    """Every key the commit script declares carries the pipeline's hash tag (no CROSSSLOT on Redis Cluster)."""
    committer = GroupCommitter(sidecar_config())
    try:
        loop = asyncio.get_running_loop()
        then = datetime.now(UTC) - timedelta(days=3)
        events = [*_events(2), *_events(2, message="m1"), Event("b", "u2", then, "m2")]
        keys = committer.keys
        plan = committer._plan([(events, loop.create_future())], keys.group_commit("t"), [keys.group_commit("old")])
        assert len(plan.keys) >= 2 + 1 + 6 + 2  # dirty, token, one answered token, buckets of two days, two messages
        assert {key_slot(key.encode()) for key in plan.keys} == {key_slot(keys.dirty.encode())}
    finally:
        await committer.close()
