"""Redis memory headroom and eviction policy, watched in the background (never per request).

Every ``redis.memory_check_interval_seconds`` one ``INFO memory`` over a connection of its own: once
``used_memory`` reaches ``redis.memory_high_water_ratio`` of ``maxmemory``, ingest answers 503 (and
readiness fails) *before* Redis itself refuses writes, so Redis keeps the room the flusher needs to run
and free memory. ``maxmemory-policy`` is read on every (re)connect: an evicting policy fails readiness
unless ``redis.allow_eviction``; a refused ``CONFIG GET`` (managed Redis) is a warning and a metric.
On a Redis Cluster both are read on the master owning the sidecar's shard slot (re-found after a
failover or resharding), the node whose memory its writes use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import Gauge

from analytics_pipeline.core.redis_requirements import PolicyCheck, check_policy, memory_usage, unchecked

from .appkeys import REGISTRY, STATE
from .resp import RedisReplyError, RespConnection
from .state import SidecarState

log = logging.getLogger(__name__)


class RedisWatch:
    """The latest memory sample and policy check of the sidecar's Redis; ``state.redis_full`` for ingest."""

    def __init__(self, state: SidecarState, app: web.Application) -> None:
        self.state = state
        self.policy: PolicyCheck | None = None  # None until the first connection
        self.used = 0
        self.maxmemory = 0
        self._connection: RespConnection | None = None
        registry = app[REGISTRY]
        self._ratio = Gauge("analytics_sidecar_redis_memory_used_ratio",
                            "Redis used_memory / maxmemory at the last sample (0 without maxmemory)", registry=registry)
        self._shedding = Gauge("analytics_sidecar_redis_memory_shedding",
                               "1 while ingest answers 503 because Redis is above redis.memory_high_water_ratio",
                               registry=registry)
        self._unchecked = Gauge("analytics_sidecar_redis_policy_unchecked",
                                "1 if Redis refused CONFIG GET maxmemory-policy: noeviction is not verified",
                                registry=registry)
        self._evicting = Gauge("analytics_sidecar_redis_policy_evicting",
                               "1 if Redis runs an evicting maxmemory-policy", registry=registry)

    @property
    def ratio(self) -> float:
        return self.used / self.maxmemory if self.maxmemory else 0.0

    def problem(self) -> tuple[str, str] | None:
        """``(status, reason)`` that makes ``/readyz`` fail, or None."""
        config = self.state.config
        if self.policy is not None:
            check = dataclasses.replace(self.policy, allowed=config.redis.allow_eviction)  # reloadable
            if check.problem:
                return "misconfigured", check.problem
        if self.state.redis_full:
            return "redis_full", self.full_message()
        return None

    def full_message(self) -> str:
        limit = self.state.config.redis.memory_high_water_ratio
        return (f"Redis memory is at {self.ratio:.0%} of maxmemory, at or over the high-water mark "
                f"(redis.memory_high_water_ratio {limit:.0%}): writes are held back until the flusher frees memory")

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            await self.sample()
            await asyncio.sleep(self.state.config.redis.memory_check_interval_seconds)

    async def sample(self) -> None:
        """One sample (connecting, and so reading the policy, when needed); failures leave shedding off:
        an unreachable Redis is the committer's to report."""
        config = self.state.config
        try:
            committer = self.state.committer
            address = await committer.topology.address_for(committer.keys.slot)
            connection = self._connection
            if connection is not None and (connection.host, connection.port) != (address.host, address.port):
                self.close()  # the shard's slot has another master now
                connection = None
            if connection is None or not connection.connected:
                connection = self._connection = RespConnection(address, config.server.redis_timeout_seconds)
                await connection.connect()
                await self._check_policy(connection)
            used, maxmemory = memory_usage(await connection.execute("INFO", "memory"))
        except (OSError, RedisReplyError) as error:
            self.close()
            self._set_full(False)
            log.debug("Redis memory sample failed: %s", error)
            return
        self.used, self.maxmemory = used, maxmemory
        self._ratio.set(self.ratio)
        self._set_full(maxmemory > 0 and used >= config.redis.memory_high_water_ratio * maxmemory)

    async def _check_policy(self, connection: RespConnection) -> None:
        allowed = self.state.config.redis.allow_eviction
        try:
            check = check_policy(await connection.execute("CONFIG", "GET", "maxmemory-policy"), allowed=allowed)
        except RedisReplyError as error:  # NOPERM, or CONFIG renamed away (managed Redis)
            check = unchecked(str(error), allowed=allowed)
        self.policy = check
        self._unchecked.set(1 if check.policy is None else 0)
        self._evicting.set(1 if check.evicting else 0)
        if check.problem:
            log.error("%s", check.problem, extra={"event": "redis_policy", "policy": check.policy})
        elif check.warning:
            log.warning("%s", check.warning, extra={"event": "redis_policy", "policy": check.policy})

    def _set_full(self, full: bool) -> None:
        if full == self.state.redis_full:
            return
        self.state.redis_full = full
        self._shedding.set(1 if full else 0)
        if full:
            log.warning("%s; answering 503", self.full_message(), extra={"event": "redis_full"})
        else:
            log.info("Redis memory back under the high-water mark (%.0f%%): taking events again", 100 * self.ratio,
                     extra={"event": "redis_memory_ok"})

    def close(self) -> None:
        if self._connection is not None:
            self._connection.abort()
            self._connection = None


REDIS_WATCH = web.AppKey("redis_watch", RedisWatch)


def setup_redis_watch(app: web.Application) -> None:
    """Create the app's :class:`RedisWatch` and run it for the app's lifetime."""
    watch = app[REDIS_WATCH] = RedisWatch(app[STATE], app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        watch.close()

    app.cleanup_ctx.append(lifecycle)
