"""Claims that survive a failover: run the claim on one connection to the pipeline's master, then WAIT.

A claim RENAMEs live buckets to staging keys. If the master dies before a replica has that claim and
the replica is promoted, the live buckets reappear there (still dirty) while PostgreSQL may already
hold the unit: the next run would flush them again under a new unit, a double count. So when the
master has replicas, a unit is applied only once ``WAIT <replicas> <timeout>`` says enough of them hold
its claim. WAIT counts the writes of the connection it is sent on, and redis-py's pools (per node on a
cluster) hand out any free connection: :class:`ClaimLink` is a single-connection client to the master
that owns the pipeline's slot (found through the cluster client's slot map), used for the claim and
its WAIT alone. A unit recovered from an earlier run gets a barrier first (a write on the same
connection, ``INCR claimseq``, then WAIT): replication is one ordered stream, so once that write is on
the replicas, the old claim is too.

How many replicas: ``server.wait_replicas`` when set (the bar the sidecar acks with), otherwise every
replica connected to that master (``INFO replication`` ``connected_slaves``) when the run starts.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.redis_clients import is_cluster_client

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 10.0  # the link's socket timeout at least (as the flusher's client)
SOCKET_MARGIN_S = 5.0  # the link's socket timeout = WAIT's timeout + this (WAIT blocks the connection)


def connected_replicas(info: dict[str, Any]) -> int:
    """``connected_slaves`` of an ``INFO replication`` reply (0 on a replica or when absent)."""
    if info.get("role") not in (None, "master"):
        return 0
    return int(info.get("connected_slaves", 0) or 0)


class ClaimLink:
    """One connection to the master owning a pipeline's slot: the claim runs on it, WAIT counts it."""

    def __init__(self, client: aioredis.Redis, keys: PipelineKeys, *, wanted: int, timeout_s: float,
                 socket_timeout_s: float) -> None:
        self.client = client  # the flusher's client (Redis or RedisCluster)
        self.keys = keys
        self.wanted = wanted  # server.wait_replicas (0 = every connected replica)
        self.timeout_s = timeout_s
        self.socket_timeout_s = max(socket_timeout_s, timeout_s + SOCKET_MARGIN_S)
        self.required = 0
        self.node = ""  # host:port of the master the link talks to
        self.link: aioredis.Redis | None = None

    async def open(self) -> int:
        """Connect to the slot's master; returns how many replicas each claim must reach (0: no WAIT)."""
        await self.close()
        link = self._connect()
        try:
            if self.wanted:
                self.required = self.wanted
            else:
                self.required = connected_replicas(await link.info("replication"))
        except redis.exceptions.ResponseError as error:  # INFO refused (ACL): nothing to wait for known
            log.warning("pipeline %s: cannot read INFO replication on %s (%s): claims are not WAITed for; set "
                        "server.wait_replicas to require replicas", self.keys.pipeline, self.node, error)
            self.required = 0
        except BaseException:
            await link.aclose()
            raise
        self.link = link
        if not self.required:
            await self.close()  # no replicas: claims go through the flusher's client, as on a lone Redis
        return self.required

    def _connect(self) -> aioredis.Redis:
        if is_cluster_client(self.client):
            node = self.client.get_node_from_key(self.keys.dirty)  # type: ignore[attr-defined]
            connection_class, kwargs = node.connection_class, dict(node.connection_kwargs)
        else:
            pool = self.client.connection_pool
            connection_class, kwargs = pool.connection_class, dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = self.socket_timeout_s
        self.node = f"{kwargs.get('host')}:{kwargs.get('port')}" if kwargs.get("host") else str(kwargs.get("path"))
        pool = aioredis.ConnectionPool(connection_class=connection_class, max_connections=1, **kwargs)
        return aioredis.Redis(connection_pool=pool, single_connection_client=True)

    @property
    def active(self) -> bool:
        """Whether claims must run on the link and be WAITed for."""
        return self.link is not None

    async def refresh(self) -> None:
        """After MOVED/READONLY (slot moved, replica promoted): reload the slot map and reconnect."""
        if is_cluster_client(self.client):
            await self.client.nodes_manager.initialize()  # type: ignore[attr-defined]
        await self.open()

    async def wait(self) -> int:
        """WAIT for the link's writes so far; returns how many replicas acknowledged them."""
        assert self.link is not None
        return int(await self.link.execute_command("WAIT", self.required, int(self.timeout_s * 1000)))

    async def barrier(self) -> int:
        """A write on the link (``INCR claimseq``: a query then retries once, harmless) and its WAIT: once
        replicas hold it they hold every earlier claim of this master too."""
        assert self.link is not None
        await self.link.incr(self.keys.claim_seq)
        return await self.wait()

    async def close(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            with contextlib.suppress(Exception):
                await link.aclose()
                await link.connection_pool.disconnect()


def claim_link(client: aioredis.Redis, keys: PipelineKeys, config: Config,
               socket_timeout_s: float = REDIS_TIMEOUT_S) -> ClaimLink:
    """The :class:`ClaimLink` of a pipeline under ``config`` (server.wait_replicas and its timeout)."""
    return ClaimLink(client, keys, wanted=config.server.wait_replicas,
                     timeout_s=config.server.wait_replicas_timeout_seconds, socket_timeout_s=socket_timeout_s)
