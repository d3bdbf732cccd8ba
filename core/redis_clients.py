"""The one place that makes redis-py clients, so every component outside the sidecar's hot path talks to a
plain Redis and to a Redis Cluster alike.

``config.redis.cluster`` chooses the client: ``on`` -> :class:`redis.asyncio.RedisCluster` (follows
MOVED/ASK, refreshes its slot map, SCANs every master), ``off`` -> :class:`redis.asyncio.Redis`,
``auto`` -> ask the server the URL names (``INFO cluster``: ``cluster_enabled:1``). A URL may name any
node of a cluster. A mode that does not match the server fails with :class:`RedisModeError`, whose
message says how to fix it (``off`` on a cluster node shows up as MOVED replies: see :func:`mode_hint`).
redis-py is imported inside the functions: the sidecar loads it only when a read endpoint needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

ClusterMode = Literal["auto", "on", "off"]

FIX_OFF = ("REDIS_URL names a node of a Redis Cluster but redis.cluster is 'off': set redis.cluster: auto "
           "(or on; CR spec.redis.cluster) so the cluster client follows the slot map")
FIX_ON = ("redis.cluster is 'on' but {url} is not a Redis Cluster node (cluster_enabled:0): set redis.cluster: "
          "auto (or off; CR spec.redis.cluster), or point REDIS_URL at a cluster node")
_SELECT_REFUSED = "SELECT is not allowed in cluster mode"


class RedisModeError(ValueError):
    """``redis.cluster`` does not match the server (or the URL cannot address a cluster); says how to fix it."""


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else url


def _db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def cluster_enabled(info: dict[str, Any] | str | bytes) -> bool:
    """Whether an ``INFO cluster`` reply (parsed or raw) says ``cluster_enabled:1``."""
    if isinstance(info, dict):
        return str(info.get("cluster_enabled", "0")) == "1"
    text = info.decode() if isinstance(info, bytes) else info
    return "cluster_enabled:1" in text


def _options(decode_responses: bool, timeout: float | None, connect_timeout: float | None) -> dict[str, Any]:
    return {"decode_responses": decode_responses, "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout if connect_timeout is not None else timeout}


def _check_cluster_url(url: str) -> None:
    if _db_of(url):
        raise RedisModeError(f"a Redis Cluster has only database 0: drop '/{_db_of(url)}' from REDIS_URL "
                             f"({_redact(url)})")


async def detect_cluster(url: str, timeout: float | None = 5.0) -> bool:  # noqa: ASYNC109 (socket timeout)
    """Ask the node ``url`` names whether it runs in cluster mode (``INFO cluster``)."""
    import redis.asyncio as aioredis
    import redis.exceptions

    probe = aioredis.Redis.from_url(url, single_connection_client=True, **_options(True, timeout, None))
    try:
        return cluster_enabled(await probe.info("cluster"))
    except redis.exceptions.ResponseError as error:
        if _SELECT_REFUSED in str(error):  # the URL names a database: only a cluster node refuses SELECT so
            return True
        raise
    finally:
        await probe.aclose()


def detect_cluster_sync(url: str, timeout: float | None = 5.0) -> bool:
    """:func:`detect_cluster` for synchronous callers."""
    import redis

    probe = redis.Redis.from_url(url, **_options(True, timeout, None))
    try:
        return cluster_enabled(probe.info("cluster"))  # type: ignore[arg-type]
    except redis.exceptions.ResponseError as error:
        if _SELECT_REFUSED in str(error):
            return True
        raise
    finally:
        probe.close()


def _make_async(url: str, cluster: bool, options: dict[str, Any]) -> aioredis.Redis | aioredis.RedisCluster:
    import redis.asyncio as aioredis

    if cluster:
        _check_cluster_url(url)
        return aioredis.RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


async def async_client(url: str, mode: ClusterMode = "auto", *, decode_responses: bool = False,
                       timeout: float | None = 10.0, connect_timeout: float | None = None,  # noqa: ASYNC109
                       **kwargs: Any) -> aioredis.Redis | aioredis.RedisCluster:
    """A ready client for ``url``: RedisCluster (slot map loaded) or Redis, as ``mode`` and the server say.

    RedisModeError when ``on`` meets a plain Redis (or a cluster URL names a database other than 0)."""
    import redis.exceptions

    options = {**_options(decode_responses, timeout, connect_timeout), **kwargs}
    cluster = mode == "on" or (mode == "auto" and await detect_cluster(url, timeout))
    if mode == "on" and _db_of(url) and not await detect_cluster(url, timeout):
        raise RedisModeError(FIX_ON.format(url=_redact(url)))  # the first thing to fix, before the database
    client = _make_async(url, cluster, options)
    if cluster:
        try:
            await client.initialize()  # type: ignore[union-attr]  # loads the slot map: fails here, not mid-run
        except redis.exceptions.RedisClusterException as error:
            await client.aclose()
            if "not enabled" in str(error):
                raise RedisModeError(FIX_ON.format(url=_redact(url))) from None
            raise
    return client


def async_client_for(url: str, cluster: bool, *, decode_responses: bool = False, timeout: float | None = 10.0,
                     connect_timeout: float | None = None, **kwargs: Any) -> aioredis.Redis | aioredis.RedisCluster:
    """An (unconnected) client when the mode is already known (e.g. :func:`resolve_mode_sync` decided it)."""
    return _make_async(url, cluster, {**_options(decode_responses, timeout, connect_timeout), **kwargs})


def resolve_mode_sync(url: str, mode: ClusterMode, timeout: float | None = 5.0) -> bool:
    """Whether ``url`` is to be treated as a cluster under ``mode`` (``auto`` asks the server, blocking)."""
    if mode == "auto":
        return detect_cluster_sync(url, timeout)
    return mode == "on"


def sync_client(url: str, mode: ClusterMode = "auto", *, decode_responses: bool = False,
                timeout: float | None = 10.0, **kwargs: Any) -> redis.Redis | redis.RedisCluster:
    """The synchronous counterpart of :func:`async_client` (admin tools, test helpers)."""
    import redis

    options = {**_options(decode_responses, timeout, None), **kwargs}
    if resolve_mode_sync(url, mode, timeout):
        _check_cluster_url(url)
        try:
            return redis.RedisCluster.from_url(url, **options)
        except redis.exceptions.RedisClusterException as error:
            if "not enabled" in str(error):
                raise RedisModeError(FIX_ON.format(url=_redact(url))) from None
            raise
    return redis.Redis.from_url(url, **options)


def is_cluster_client(client: object) -> bool:
    """True for redis-py's (async or sync) cluster client."""
    import redis
    import redis.asyncio as aioredis

    return isinstance(client, aioredis.RedisCluster | redis.RedisCluster)


def mode_hint(error: BaseException) -> str | None:
    """How to fix a MOVED/ASK reply (a plain client on a cluster node: ``redis.cluster: off``), else None."""
    import redis.exceptions

    if isinstance(error, redis.exceptions.AskError):  # MovedError is an AskError
        return FIX_OFF
    return None
