"""Liveness, readiness and metrics endpoints: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .appkeys import REDIS, REGISTRY, STATE


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop turns (no dependency is checked)."""
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to take events: config loaded, Redis answers PING, not draining; 503 otherwise."""
    state = request.app[STATE]
    body: dict[str, object] = {"pipeline": state.config.pipeline}
    if state.draining:
        return _json(503, {**body, "status": "draining", "reason": "shutting down"})
    try:
        async with asyncio.timeout(state.config.server.redis_timeout_seconds):
            await request.app[REDIS].ping()
    except Exception as error:
        return _json(503, {**body, "status": "unavailable", "reason": f"Redis does not answer: {error!r}"})
    return _json(200, {**body, "status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry."""
    payload = generate_latest(request.app[REGISTRY])
    response = web.Response(body=payload)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def setup_health_routes(app: web.Application) -> None:
    """Register ``/healthz``, ``/readyz`` and ``/metrics`` on ``app``."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
