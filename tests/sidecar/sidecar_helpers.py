"""Helpers of the sidecar tests: a running sidecar with a client, and Redis read-back functions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from analytics_pipeline.core.keys import PipelineKeys, split_user_field
from analytics_pipeline.sidecar.appkeys import STATE


@dataclass
class Answer:
    """One HTTP answer of the sidecar."""

    status: int
    body: Any
    headers: Any


class Sidecar:
    """A sidecar app served on a free loopback port, plus a client session pointed at it."""

    def __init__(self, app: web.Application, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.server = server
        self.session = session
        self.url = str(server.make_url(""))

    @property
    def metrics(self) -> Any:
        return self.app[STATE].metrics

    async def post(self, path: str, payload: Any = None, *, raw: bytes | None = None,
                   content_type: str | None = "application/json", headers: dict[str, str] | None = None) -> Answer:
        data = raw if raw is not None else orjson.dumps(payload)
        sent = dict(headers or {})
        if content_type is not None:
            sent["Content-Type"] = content_type
        skip = () if content_type is not None else ("Content-Type",)
        async with self.session.post(self.url + path, data=data, headers=sent, skip_auto_headers=skip) as response:
            text = await response.read()
            try:
                body = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                body = text
            return Answer(response.status, body, response.headers)

    async def get(self, path: str) -> Answer:
        async with self.session.get(self.url + path) as response:
            text = await response.read()
            try:
                body = orjson.loads(text)
            except orjson.JSONDecodeError:
                body = text.decode()
            return Answer(response.status, body, response.headers)


SidecarFactory = Callable[..., Awaitable[Sidecar]]


# ------------------------------------------------------------------------------- Redis read-back
async def pipeline_keys(client: aioredis.Redis, keys: PipelineKeys) -> list[str]:
    """Every Redis key of the pipeline, sorted."""
    return sorted([key async for key in client.scan_iter(match=keys.scan_pattern, count=1000)])


async def kind_totals(client: aioredis.Redis, keys: PipelineKeys, kind: str) -> dict[str, int]:
    """Sum of every live bucket of one kind (``d``, ``h``, ``u``), field by field."""
    totals: dict[str, int] = {}
    pattern = keys.scan_pattern[:-1] + f"{kind}:*"
    async for key in client.scan_iter(match=pattern, count=1000):
        for field, value in (await client.hgetall(key)).items():
            totals[field] = totals.get(field, 0) + int(value)
    return totals


async def grand_total(client: aioredis.Redis, keys: PipelineKeys, kind: str = "d") -> int:
    """Total count over every bucket of one kind."""
    return sum((await kind_totals(client, keys, kind)).values())


def per_event(user_totals: dict[str, int]) -> dict[str, int]:
    """Fold per-user fields back to event types."""
    folded: dict[str, int] = {}
    for field, value in user_totals.items():
        event, _ = split_user_field(field)
        folded[event] = folded.get(event, 0) + value
    return folded


async def first_event_accepted(port: int, attempts: int, delay: float) -> bool:
    """POST one event to a sidecar that is starting on ``port`` until it answers (it must answer 200);
    False if it never listened within ``attempts`` tries ``delay`` seconds apart."""
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
            try:
                async with session.post(f"http://127.0.0.1:{port}/v1/events", json={"event": "a"}) as answer:
                    assert answer.status == 200
                    return True
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(delay)
    return False
