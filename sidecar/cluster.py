"""Redis Cluster routing for the sidecar's own RESP connections (redis-py stays off the ingest path).

:class:`Topology` knows whether the configured Redis is a cluster (``redis.cluster: auto`` asks
``INFO cluster`` once; ``on``/``off`` force it) and, on a cluster, which master owns each slot
(``CLUSTER SLOTS``, asked of any node that answers: ``REDIS_URL`` may name any node).
:class:`RoutedConnection` is what the group committer holds: on a plain Redis one connection,
exactly as before; on a cluster one connection per master, each command sent to the owner of its
key's slot. Redirections:

* ``MOVED`` — the slot has a new owner and the command did not run: update the map (and reload it
  from the new owner) and send the command again there.
* ``ASK`` — the slot is being migrated and this key is already at the target: ``ASKING`` and the
  command, pipelined on one connection to the named node; the map is not changed.
* ``TRYAGAIN``/``CLUSTERDOWN``/``LOADING`` — refused, nothing ran: the caller answers 503.

A connection that cannot be opened raises :class:`RedisConnectFailed` (nothing was sent); a lost
connection or a timeout after sending stays ambiguous for the caller's fence, and marks the map
stale so the next command (the fence) asks the cluster who owns the slot now.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from prometheus_client import Counter

from analytics_pipeline.core.keys import CLUSTER_SLOTS, key_slot

from .resp import RedisAddress, RedisConnectFailed, RedisReplyError, RedisUnavailable, RespConnection, parse_url

MAX_REDIRECTS = 5  # MOVED/ASK hops for one command before giving up (a slot never moves that often)
REFRESH_INTERVAL = 0.05  # s: at most this often is CLUSTER SLOTS asked again while the map is stale
# Commands without a key: sent where the lane's previous command went (WAIT must follow its write).
_KEYLESS = frozenset({"WAIT", "SCRIPT", "PING", "INFO", "CONFIG", "CLUSTER", "ASKING"})
_SCRIPTS = frozenset({"EVALSHA", "EVAL"})
REFUSED_PREFIXES = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN")  # refused for now: nothing ran


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Topology:
    """Cluster or not, and the slot -> master map; shared by every connection of one sidecar."""

    def __init__(self, url: str, timeout: float, mode: str = "auto", redirects: Counter | None = None) -> None:
        self.address = parse_url(url)
        self.timeout = timeout
        self.cluster: bool | None = None if mode == "auto" else mode == "on"
        self.seed = f"{self.address.host}:{self.address.port}"
        self._owners: list[str | None] = [None] * CLUSTER_SLOTS
        self._nodes: list[str] = [self.seed]  # every node seen (masters and replicas), asked in turn
        self.stale = True
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = -1.0
        self._slots: dict[Any, int] = {}
        self._moved = redirects.labels("moved") if redirects is not None else None
        self._ask = redirects.labels("ask") if redirects is not None else None

    # ------------------------------------------------------------------------------ lookups
    def slot_of(self, key: Any) -> int:
        """``key_slot`` with a small cache (the committer's first key is the same on every commit)."""
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) > 4096:
                self._slots.clear()
            slot = self._slots[key] = key_slot(key)
        return slot

    def owner(self, slot: int) -> str:
        """``host:port`` of the master owning ``slot`` (the seed while unknown)."""
        return self._owners[slot] or self.seed

    def node_address(self, node: str) -> RedisAddress:
        """Connection settings for one node: the URL's credentials and TLS, its host and port, db 0."""
        if not self.cluster:
            return self.address
        host, _, port = node.rpartition(":")
        return dataclasses.replace(self.address, host=host, port=int(port), path=None, db=0)

    async def address_for(self, slot: int) -> RedisAddress:
        """Where the master owning ``slot`` is (the URL's server on a plain Redis)."""
        await self.ensure()
        return self.node_address(self.owner(slot)) if self.cluster else self.address

    # ------------------------------------------------------------------------------ updates
    def invalidate(self) -> None:
        """Something failed: ask the cluster for the slot map before the next command."""
        if self.cluster is not False:
            self.stale = True

    def moved(self, slot: int, node: str) -> None:
        """A ``MOVED`` reply: the slot is at ``node`` now (and other slots may have moved too)."""
        if self._moved is not None:
            self._moved.inc()
        self._owners[slot] = node
        self.stale = True
        self._refreshed_at = -1.0  # a real move: reload at once

    def asked(self) -> None:
        if self._ask is not None:
            self._ask.inc()

    async def ensure(self, first: str | None = None) -> None:
        """Detect cluster mode (``auto``) and load the slot map when stale; RedisConnectFailed if nobody answers."""
        if self.cluster is None:
            await self._detect()
        if self.cluster and self.stale:
            await self.refresh(first)

    async def _detect(self) -> None:
        connection = RespConnection(dataclasses.replace(self.address, db=0), self.timeout)  # no SELECT on a cluster
        try:
            try:
                await connection.connect()
            except OSError as error:
                raise RedisConnectFailed(str(error)) from None
            try:
                info = _text(await connection.execute("INFO", "cluster"))
            except RedisReplyError:  # INFO refused (ACLs, renamed): not a cluster we can route for
                info = ""
        finally:
            connection.abort()
        self.cluster = "cluster_enabled:1" in info

    async def refresh(self, first: str | None = None) -> None:
        """Reload the slot map with ``CLUSTER SLOTS`` from the first node that answers (one refresh at a time)."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        if time.monotonic() - self._refreshed_at < REFRESH_INTERVAL:
            return  # just asked: the caller goes on with what we know (and fails fast if it is wrong)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshing = done
        try:
            candidates = list(dict.fromkeys([*([first] if first else []), *self._nodes]))
            problems = []
            for node in candidates:
                connection = RespConnection(dataclasses.replace(self.node_address(node), db=0), self.timeout)
                try:
                    await connection.connect()
                    reply = await connection.execute("CLUSTER", "SLOTS")
                except (OSError, RedisReplyError) as error:
                    problems.append(f"{node}: {error}")
                    continue
                finally:
                    connection.abort()
                if self._load(reply, node):
                    return
                problems.append(f"{node}: no slots assigned")
            raise RedisConnectFailed(f"no Redis Cluster node gave a slot map ({'; '.join(problems)})")
        finally:
            self._refreshed_at = time.monotonic()
            self._refreshing = None
            done.set_result(None)

    def _load(self, reply: Any, source: str) -> bool:
        owners: list[str | None] = [None] * CLUSTER_SLOTS
        nodes: list[str] = []
        default_host = source.rpartition(":")[0]
        for entry in reply or ():
            start, end = int(entry[0]), int(entry[1])
            names = [f"{_text(node[0]) or default_host}:{int(node[1])}" for node in entry[2:]]
            if not names:
                continue
            owners[start:end + 1] = [names[0]] * (end - start + 1)
            nodes += names
        if not nodes:
            return False
        self._owners = owners
        self._nodes = list(dict.fromkeys([*nodes, *self._nodes]))
        self.stale = False
        return True


class RoutedConnection:
    """The committer's lane: ``connect``/``execute``/``execute_within``/``abort``, routed on a cluster.

    ``slot`` is where keyless commands go before anything else was sent (the sidecar's shard slot);
    afterwards they follow the previous command, so ``WAIT`` counts the write it follows.
    """

    def __init__(self, topology: Topology, slot: int) -> None:
        self.topology = topology
        self.slot = slot
        self._single = RespConnection(topology.address, topology.timeout)
        self._nodes: dict[str, RespConnection] = {}
        self._last: RespConnection | None = None

    @property
    def connected(self) -> bool:
        if not self.topology.cluster:
            return self._single.connected
        last = self._last
        return last is not None and last.connected and not self.topology.stale

    async def connect(self) -> None:
        """Detect the mode and open the connection to the shard's master; nothing is sent on failure."""
        topology = self.topology
        await topology.ensure()
        if not topology.cluster:
            await self._single.connect()
            return
        self._last = await self._connection(topology.owner(self.slot))

    async def execute(self, *args: Any) -> Any:
        """One command, to its slot's master on a cluster (following MOVED/ASK); see :class:`RespConnection`."""
        if not self.topology.cluster:
            return await self._single.execute(*args)
        return await self._routed(args, None)

    async def execute_within(self, seconds: float, *args: Any) -> Any:
        """Like :meth:`execute` with a timeout of its own (``WAIT``)."""
        if not self.topology.cluster:
            return await self._single.execute_within(seconds, *args)
        return await self._routed(args, seconds)

    async def _routed(self, args: tuple[Any, ...], seconds: float | None) -> Any:
        topology = self.topology
        name = args[0]
        if name in _SCRIPTS:
            key = args[3] if int(args[2]) > 0 else None
        else:
            key = None if name in _KEYLESS else args[1]
        slot = topology.slot_of(key) if key is not None else None
        asking: str | None = None  # ASK target: this command once, with ASKING
        moved: str | None = None  # MOVED target: authoritative for this retry, whatever a refresh said
        for _ in range(MAX_REDIRECTS + 1):
            if topology.stale:
                await topology.ensure()
            if asking is not None:
                connection = await self._connection(asking)
            elif moved is not None:
                connection = await self._connection(moved)
            elif slot is None and self._last is not None and self._last.connected:
                connection = self._last
            else:
                connection = await self._connection(topology.owner(self.slot if slot is None else slot))
            self._last = connection
            try:
                if asking is not None:
                    return await connection.execute_asking(*args)
                if seconds is not None:
                    return await connection.execute_within(seconds, *args)
                return await connection.execute(*args)
            except RedisReplyError as error:
                text = str(error)
                if text.startswith("MOVED "):
                    _, moved_slot, node = text.split()
                    topology.moved(int(moved_slot), node)
                    await topology.ensure(first=node)
                    asking, moved = None, node
                    continue
                if text.startswith("ASK "):
                    topology.asked()
                    asking, moved = text.split()[2], None
                    continue
                if text.startswith(("CLUSTERDOWN", "MASTERDOWN")):
                    topology.invalidate()  # a failover under way: ask again who owns the slot
                raise
            except OSError:
                topology.invalidate()  # a failover, most likely: who owns the slot now?
                raise
        raise RedisReplyError(f"more than {MAX_REDIRECTS} MOVED/ASK redirections for one command")

    async def _connection(self, node: str) -> RespConnection:
        connection = self._nodes.get(node)
        if connection is not None and connection.connected:
            return connection
        connection = self._nodes[node] = RespConnection(self.topology.node_address(node), self.topology.timeout)
        try:
            await connection.connect()
        except (OSError, RedisReplyError) as error:
            self.topology.invalidate()
            raise RedisConnectFailed(f"cannot connect to Redis Cluster node {node}: {error}") from None
        return connection

    def abort(self) -> None:
        """Close every connection at once (RST)."""
        self._single.abort()
        for connection in self._nodes.values():
            connection.abort()
        self._nodes.clear()
        self._last = None


__all__ = ["REFUSED_PREFIXES", "RedisUnavailable", "RoutedConnection", "Topology"]
