"""message_id dedup: a retried or concurrently repeated event is counted once, atomically with its increment."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, grand_total
from support import fresh_ttls

from analytics_pipeline.core.events import Event
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.appkeys import STATE
from analytics_pipeline.sidecar.committer import GroupCommitter


async def test_same_message_id_twice_counts_once(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                 keys: PipelineKeys) -> None:
    event = {"event": "purchase", "user_id": "u1", "message_id": "m-1"}
    since = time.monotonic()
    assert (await sidecar.post("/v1/events", event)).body == {"accepted": 1, "duplicates": 0}
    assert (await sidecar.post("/v1/events", event)).body == {"accepted": 0, "duplicates": 1}
    now = datetime.now(UTC)
    assert await redis_client.hgetall(keys.daily(now)) == {"purchase": "1"}
    assert await redis_client.hgetall(keys.hourly(now)) == {"purchase": "1"}
    assert await grand_total(redis_client, keys, "u") == 1
    # remembered in one dedup shard that outlives the window by at most half a window (its slice)
    window = sidecar.app[STATE].config.ingest.dedup_window_seconds
    shards = [key async for key in redis_client.scan_iter(match=keys.dedup_scan_pattern)
              if not key.endswith((":L", ":n"))]  # a slice's base level and count
    assert len(shards) == 1 and await redis_client.hlen(shards[0]) == 1
    shard_ttl = await redis_client.ttl(shards[0])  # read before the window below is computed
    assert fresh_ttls(window, since).start <= shard_ttl <= window + (window + 1) // 2
    assert sidecar.metrics.events_duplicate._value.get() == 1


async def test_same_id_twice_in_one_batch_and_mixed_with_plain_events(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    batch = [{"event": "a", "message_id": "x"}, {"event": "a"}, {"event": "a", "message_id": "x"},
             {"event": "a"}, {"event": "b", "messageId": "y"}, {"event": "b", "uuid": "y"}]
    assert (await sidecar.post("/v1/events", batch)).body == {"accepted": 4, "duplicates": 2}
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"a": "3", "b": "1"}


async def test_concurrent_clients_sending_the_same_ids_count_once(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    # A window of 0 ms makes concurrent requests spread over many group commits, 2 in flight at a time.
    sidecars = [await start_sidecar(sidecar_config(server={"group_commit_window_ms": window}))
                for window in (0, 2)]
    ids = [f"shared-{n}" for n in range(20)]

    async def client(number: int) -> tuple[int, int]:
        sidecar = sidecars[number % 2]
        accepted = duplicates = 0
        for message_id in ids[number % 3:] + ids[: number % 3]:
            answer = await sidecar.post("/v1/events", {"event": "retry", "message_id": message_id})
            assert answer.status == 200, answer.body
            accepted += answer.body["accepted"]
            duplicates += answer.body["duplicates"]
        return accepted, duplicates

    results = await asyncio.gather(*(client(n) for n in range(12)))
    assert sum(a for a, _ in results) == len(ids)
    assert sum(d for _, d in results) == 12 * len(ids) - len(ids)
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"retry": str(len(ids))}


async def test_dedup_window_zero_disables_dedup(start_sidecar: SidecarFactory, sidecar_config,
                                                redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"dedup_window_seconds": 0}))
    event = {"event": "a", "message_id": "m"}
    assert (await sidecar.post("/v1/events", [event, event])).body == {"accepted": 2, "duplicates": 0}
    assert (await sidecar.post("/v1/events", event)).body == {"accepted": 1, "duplicates": 0}
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"a": "3"}
    assert not await redis_client.exists(keys.message("m"))
    assert not [key async for key in redis_client.scan_iter(match="*:dd:*")]





async def dedup_bytes(client: aioredis.Redis, keys: PipelineKeys, counters: set[str]) -> tuple[int, int]:
    """(bytes, keys) of what a pipeline keeps for dedup: every key but its counters, dirty set and fence
    tokens. Bytes = MEMORY USAGE of each (value, key name, its dict entry) plus its entry in Redis's
    expires dict (pointer + dictEntry, 32 B), which MEMORY USAGE leaves out."""
    found = [key async for key in client.scan_iter(match=keys.scan_pattern, count=1000)
             if key not in counters and key != keys.dirty and ":gc:" not in key]
    total = 0
    for key in found:
        total += int(await client.memory_usage(key, samples=0)) + 32
    return total, len(found)


@pytest.mark.parametrize("previous_slice", [0, 20_000], ids=["first-slice", "steady-state"])
async def test_dedup_memory_is_at_most_40_bytes_per_message_id(
        sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys, previous_slice: int) -> None:
    config = sidecar_config(counters={"granularities": ["daily"]})
    slice_s = (config.ingest.dedup_window_seconds + 1) // 2
    previous = f"{keys.dedup_prefix}{slice_s}:{int((await redis_client.time())[0]) // slice_s - 1}:n"
    if previous_slice:  # as if the previous time slice had seen as many ids: shards start deeper
        await redis_client.set(previous, previous_slice, ex=60)
    committer = GroupCommitter(config)
    ids = 20_000
    try:
        for start in range(0, ids, 1000):
            now = datetime.now(UTC)
            batch = [Event("a", None, now, f"{uuid.UUID(int=n)}") for n in range(start, start + 1000)]
            assert await committer.commit(batch) == 0
        # every one of them is remembered: resent, all are duplicates
        resent = [Event("a", None, datetime.now(UTC), f"{uuid.UUID(int=n)}") for n in range(0, ids, 7)]
        assert await committer.commit(resent) == len(resent)
    finally:
        await committer.close()
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"a": str(ids)}
    await redis_client.delete(previous)  # not part of what these ids cost
    used, shards = await dedup_bytes(redis_client, keys, {keys.daily(datetime.now(UTC))})
    print(f"dedup ({previous_slice} ids in the previous slice): {used / ids:.1f} B per message_id over {shards} keys")
    assert shards and used / ids <= 40
    sample = [key async for key in redis_client.scan_iter(match=keys.dedup_scan_pattern, count=1000)
              if not key.endswith((":L", ":n"))][:20]
    assert sample and {await redis_client.object("encoding", key) for key in sample} == {"listpack"}


async def test_markers_of_the_one_key_per_id_layout_are_still_honoured(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    # written by a sidecar of the previous release (SET ap:{p}:msg:<id> 1 NX EX window) before the upgrade
    await redis_client.set(keys.message("sent-before-upgrade"), 1, ex=3600)
    event = {"event": "a", "message_id": "sent-before-upgrade"}
    assert (await sidecar.post("/v1/events", event)).body == {"accepted": 0, "duplicates": 1}
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {}
