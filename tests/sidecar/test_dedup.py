"""message_id dedup: a retried or concurrently repeated event is counted once, atomically with its increment."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, grand_total

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.appkeys import STATE


async def test_same_message_id_twice_counts_once(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                 keys: PipelineKeys) -> None:
    event = {"event": "purchase", "user_id": "u1", "message_id": "m-1"}
    assert (await sidecar.post("/v1/events", event)).body == {"accepted": 1, "duplicates": 0}
    assert (await sidecar.post("/v1/events", event)).body == {"accepted": 0, "duplicates": 1}
    now = datetime.now(UTC)
    assert await redis_client.hgetall(keys.daily(now)) == {"purchase": "1"}
    assert await redis_client.hgetall(keys.hourly(now)) == {"purchase": "1"}
    assert await grand_total(redis_client, keys, "u") == 1
    window = sidecar.app[STATE].config.ingest.dedup_window_seconds
    assert window - 5 <= await redis_client.ttl(keys.message("m-1")) <= window
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



