"""50 concurrent clients against a real server: Redis totals equal exactly what was acknowledged."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, grand_total, kind_totals

from analytics_pipeline.core.keys import PipelineKeys


async def test_fifty_concurrent_clients_singles_and_batches(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    acked: dict[str, int] = {}
    acked_users = 0

    async def client(number: int) -> None:
        nonlocal acked_users
        rng = random.Random(number)
        for request in range(12):
            size = rng.choice([1, 1, 1, 2, 5, 40])
            events = [{"event": f"e{rng.randrange(4)}", "user_id": f"u{rng.randrange(30)}"
                       if rng.random() < 0.7 else None} for _ in range(size)]
            for event in events:
                if event["user_id"] is None:
                    del event["user_id"]
                if rng.random() < 0.2:
                    event["message_id"] = f"c{number}-r{request}-{rng.random()}"
            path, body = ("/v1/events", events[0]) if size == 1 else rng.choice(
                [("/v1/events", events), ("/v1/batch", {"batch": events})])
            answer = await sidecar.post(path, body)
            assert answer.status == 200, answer.body
            assert (answer.body["accepted"], answer.body["duplicates"]) == (size, 0)
            for event in events:
                acked[event["event"]] = acked.get(event["event"], 0) + 1
                acked_users += "user_id" in event

    await asyncio.gather(*(client(n) for n in range(50)))
    assert await kind_totals(redis_client, keys, "d") == acked
    assert await kind_totals(redis_client, keys, "h") == acked
    assert await grand_total(redis_client, keys, "u") == acked_users
    total = sum(acked.values())
    assert sidecar.metrics.events_accepted._value.get() == total
    registry = sidecar.metrics.registry
    assert registry.get_sample_value("analytics_sidecar_group_commit_requests_sum") == 50 * 12
    # Requests really were grouped: fewer commits than requests.
    assert registry.get_sample_value("analytics_sidecar_group_commit_requests_count") < 50 * 12
