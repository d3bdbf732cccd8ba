"""Helpers of the Redis Cluster / replicated-ack tests: closed-loop load with exact tallies, counter read-back."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.cluster import RedisCluster
from sidecar_helpers import Sidecar

from analytics_pipeline.core.keys import PipelineKeys


@dataclass
class Tally:
    """What the sidecar acknowledged (per event type) and how it answered."""

    acked: dict[str, int] = field(default_factory=dict)
    answers: dict[int, int] = field(default_factory=dict)

    @property
    def acked_total(self) -> int:
        return sum(self.acked.values())


async def closed_loop(sidecar: Sidecar, stop: asyncio.Event, clients: int = 16, tally: Tally | None = None,
                      seed: int = 0) -> Tally:
    """Clients posting events without message_id until ``stop``: 200s tallied, 503s must carry Retry-After."""
    tally = tally or Tally()

    async def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while not stop.is_set():
            size = rng.choice([1, 1, 3, 10])
            events = [{"event": f"e{rng.randrange(3)}", "user_id": f"u{rng.randrange(5)}"} for _ in range(size)]
            answer = await sidecar.post("/v1/events", events if size > 1 else events[0])
            tally.answers[answer.status] = tally.answers.get(answer.status, 0) + 1
            if answer.status == 200:
                assert answer.body == {"accepted": size, "duplicates": 0}
                for event in events:
                    tally.acked[event["event"]] = tally.acked.get(event["event"], 0) + 1
            else:
                assert answer.status == 503, answer.body
                assert int(answer.headers["Retry-After"]) >= 1
                await asyncio.sleep(0.02)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return tally


def daily_totals(client: RedisCluster | Any, keys: PipelineKeys) -> dict[str, int]:
    """Today's live daily counters of one shard, per event type."""
    raw = client.hgetall(keys.daily(datetime.now(UTC)))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    """A sample of the sidecar's registry (0 when absent)."""
    return sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_for(condition: Any, seconds: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition()`` (sync) until true; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
