"""Liveness, readiness and metrics endpoints: ``/healthz``, ``/readyz``, ``/metrics``.

Readiness pings Redis over a connection of its own (``sidecar/resp.py``, like the writes), not
through redis-py: probes run every few seconds and must not pull redis-py into an ingest-only
sidecar (see ``sidecar/redis_client.py``). On a Redis Cluster it pings the master that owns the
sidecar's shard slot (the one its writes go to).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .appkeys import REGISTRY, STATE
from .cluster import Topology
from .redis_watch import REDIS_WATCH
from .resp import RespConnection


class RedisProbe:
    """One Redis connection kept for readiness PINGs, (re)opened when needed; one PING at a time."""

    def __init__(self) -> None:
        self._connection: RespConnection | None = None
        self._lock = asyncio.Lock()

    async def ping(self, topology: Topology, slot: int, seconds: float) -> None:
        """PING the master of ``slot`` within ``seconds``; raises (and drops the connection) if it does not answer."""
        async with asyncio.timeout(seconds), self._lock:
            address = await topology.address_for(slot)
            connection = self._connection
            if connection is not None and (connection.host, connection.port) != (address.host, address.port):
                connection.abort()  # the slot moved (failover, resharding)
                connection = None
            if connection is None:
                connection = self._connection = RespConnection(address, seconds)
            try:
                await connection.connect()
                await connection.execute("PING")
            except BaseException:
                connection.abort()
                raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.abort()
            self._connection = None


PROBE = web.AppKey("redis_probe", RedisProbe)


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop turns (no dependency is checked)."""
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to take events: config loaded, Redis answers PING with maxmemory-policy noeviction (or
    eviction allowed) and memory under the high-water mark, not draining; 503 otherwise."""
    state = request.app[STATE]
    body: dict[str, object] = {"pipeline": state.config.pipeline, "shard": state.committer.keys.tag}
    if state.draining:
        return _json(503, {**body, "status": "draining", "reason": "shutting down"})
    try:
        committer = state.committer
        timeout = state.config.server.redis_timeout_seconds
        await request.app[PROBE].ping(committer.topology, committer.keys.slot, timeout)
    except Exception as error:
        return _json(503, {**body, "status": "unavailable", "reason": f"Redis does not answer: {error!r}"})
    problem = request.app[REDIS_WATCH].problem()
    if problem is not None:
        return _json(503, {**body, "status": problem[0], "reason": problem[1]})
    return _json(200, {**body, "status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry."""
    payload = generate_latest(request.app[REGISTRY])
    response = web.Response(body=payload)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def setup_health_routes(app: web.Application) -> None:
    """Register ``/healthz``, ``/readyz`` and ``/metrics`` on ``app`` (and the readiness connection)."""
    probe = app[PROBE] = RedisProbe()

    async def close(app: web.Application) -> None:
        probe.close()

    app.on_cleanup.append(close)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
