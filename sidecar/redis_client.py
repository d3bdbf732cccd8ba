"""The shared redis-py client of the read endpoints (``app[REDIS]``), created on first use.

Ingest writes over its own connections (``sidecar/resp.py``) and readiness pings over one too, so
redis-py is needed only by queries and the dashboard. Importing it costs ~7 MB of resident memory
(the whole package loads, whatever part is imported), a sixth of an idle sidecar: :class:`LazyRedis`
defers both the import and the client until a read request needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from .appkeys import REDIS

if TYPE_CHECKING:
    import redis.asyncio as aioredis


class LazyRedis:
    """Stands in for ``redis.asyncio.Redis.from_url(url, ...)``: attribute access creates the client."""

    __slots__ = ("_client", "timeout", "url")

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._client: aioredis.Redis | None = None

    @property
    def created(self) -> bool:
        """Whether the client (and redis-py) was needed yet."""
        return self._client is not None

    @property
    def client(self) -> aioredis.Redis:
        """The real client (decode_responses=True, timeouts as configured), created on first access."""
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=self.timeout,
                                                   socket_connect_timeout=self.timeout)
        return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.client, name)

    async def aclose(self) -> None:
        """Close the client's connections, if it was ever created."""
        if self._client is not None:
            await self._client.aclose()


def lazy_redis(url: str, timeout: float) -> aioredis.Redis:
    """A :class:`LazyRedis`, typed as the client it stands for (the type of ``app[REDIS]``)."""
    return cast("aioredis.Redis", LazyRedis(url, timeout))


def redis_client(app: web.Application) -> aioredis.Redis:
    """``app[REDIS]`` as a real redis-py client (creating it if ``app[REDIS]`` is a LazyRedis)."""
    client: Any = app[REDIS]
    return cast("aioredis.Redis", client.client if isinstance(client, LazyRedis) else client)
