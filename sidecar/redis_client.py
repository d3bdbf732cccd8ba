"""The shared redis-py client of the read endpoints (``app[REDIS]``), created on first use.

Ingest writes over its own connections (``sidecar/resp.py``) and readiness pings over one too, so
redis-py is needed only by queries and the dashboard. Importing it costs ~7 MB of resident memory
(the whole package loads, whatever part is imported), a sixth of an idle sidecar: :class:`LazyRedis`
defers both the import and the client until a read request needs them. Which client (``Redis`` or
``RedisCluster``) follows ``redis.cluster`` through core/redis_clients.py; with ``auto`` the first read
asks the server (``INFO cluster``, one blocking round trip bounded by the timeout, once per process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from analytics_pipeline.core.redis_clients import ClusterMode

from .appkeys import REDIS

if TYPE_CHECKING:
    import redis.asyncio as aioredis


class LazyRedis:
    """Stands in for ``redis.asyncio.Redis.from_url(url, ...)``: attribute access creates the client."""

    __slots__ = ("_client", "cluster", "timeout", "url")

    def __init__(self, url: str, timeout: float, cluster: ClusterMode = "auto") -> None:
        self.url = url
        self.timeout = timeout
        self.cluster: ClusterMode = cluster
        self._client: aioredis.Redis | None = None

    @property
    def created(self) -> bool:
        """Whether the client (and redis-py) was needed yet."""
        return self._client is not None

    @property
    def client(self) -> aioredis.Redis:
        """The real client (decode_responses=True, timeouts as configured), created on first access."""
        if self._client is None:
            from analytics_pipeline.core.redis_clients import async_client_for, resolve_mode_sync

            cluster = resolve_mode_sync(self.url, self.cluster, self.timeout)
            self._client = cast("aioredis.Redis", async_client_for(self.url, cluster, decode_responses=True,
                                                                   timeout=self.timeout))
        return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.client, name)

    async def aclose(self) -> None:
        """Close the client's connections, if it was ever created."""
        if self._client is not None:
            await self._client.aclose()


def lazy_redis(url: str, timeout: float, cluster: ClusterMode = "auto") -> aioredis.Redis:
    """A :class:`LazyRedis`, typed as the client it stands for (the type of ``app[REDIS]``)."""
    return cast("aioredis.Redis", LazyRedis(url, timeout, cluster))


def redis_client(app: web.Application) -> aioredis.Redis:
    """``app[REDIS]`` as a real redis-py client (creating it if ``app[REDIS]`` is a LazyRedis)."""
    client: Any = app[REDIS]
    return cast("aioredis.Redis", client.client if isinstance(client, LazyRedis) else client)
