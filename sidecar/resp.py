"""A minimal Redis connection for the group committer's hot path: one socket, hiredis parsing, no retries.

redis-py's asyncio connection spends ~50 µs of Python per command (a task per send, health
checks, pool bookkeeping); the committer sends one command per group commit and needs to know
exactly when a command may have reached the server, so it talks RESP itself over an
``asyncio.Protocol``.

Nothing here imports redis-py: importing any part of it loads the whole package (~7 MB of
resident memory), which an ingest-only sidecar never needs. :func:`parse_url` therefore reads
Redis URLs itself, with redis-py's rules (``tests/sidecar/test_resp.py`` compares the two), so
writes and queries always reach the same server and database.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis


class RedisUnavailable(ConnectionError):
    """No answer: cannot connect, or the connection broke (a command sent may or may not have run)."""


class RedisConnectFailed(RedisUnavailable):
    """The connection could not be opened: nothing was sent, so nothing can have run."""


class RedisTimeout(TimeoutError):
    """Redis did not answer in time (a command sent may or may not have run)."""


class RedisReplyError(Exception):
    """Redis answered with an error reply: the command was refused."""


class NoScriptError(RedisReplyError):
    """EVALSHA of a script Redis does not have (``NOSCRIPT``): load it and retry."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, as redis-py's ``parse_url`` reads a URL."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # unix socket
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0


def parse_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS), ``unix://[[user]:password@]/path``.

    ``?db=N`` wins over the path's db, as in redis-py; other query options are ignored.
    """
    parsed = urlparse(url)
    query = {name: values[0] for name, values in parse_qs(parsed.query).items() if values}
    db: int | None = None
    if "db" in query:
        try:
            db = int(query["db"])
        except ValueError:
            raise ValueError("Invalid value for 'db' in connection URL.") from None
    username = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    if parsed.scheme == "unix":
        return RedisAddress(path=unquote(parsed.path) if parsed.path else None, username=username,
                            password=password, db=db or 0)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError("Redis URL must specify one of the following schemes (redis://, rediss://, unix://)")
    if parsed.path and db is None:
        try:
            db = int(unquote(parsed.path).replace("/", ""))
        except ValueError:
            pass
    return RedisAddress(host=unquote(parsed.hostname) if parsed.hostname else "localhost",
                        port=int(parsed.port) if parsed.port else 6379, tls=parsed.scheme == "rediss",
                        username=username, password=password, db=db or 0)


class RespProtocol(asyncio.Protocol):
    """Pipelined request/reply matching: every ``send`` gets the next reply, in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as error:
                self._fail(RedisUnavailable(f"protocol error from Redis: {error}"))
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisUnavailable(f"connection to Redis lost: {exc or 'closed by server'}")
        self._fail(self.lost)

    def _fail(self, error: BaseException) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (a ReplyError object for error replies)."""
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise RedisUnavailable("not connected to Redis")
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        self.transport.write(packed)
        return waiter


def _raise_reply_error(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if text.startswith("NOSCRIPT"):
            raise NoScriptError(text)
        raise RedisReplyError(text)
    return reply


class RespConnection:
    """One Redis connection: ``connect()``, ``execute(*args)`` with a timeout, ``abort()``.

    ``execute`` raises :class:`RedisTimeout` / :class:`RedisUnavailable` (the command may or may not
    have run; both are OSErrors) or :class:`RedisReplyError` / :class:`NoScriptError` (it was refused).
    """

    def __init__(self, url: str | RedisAddress, timeout: float) -> None:
        address = parse_url(url) if isinstance(url, str) else url
        self.timeout = timeout
        self.host = address.host
        self.port = address.port
        self.path = address.path
        self.tls = address.tls
        self.username = address.username
        self.password = address.password
        self.db = address.db
        self._protocol: RespProtocol | None = None

    @property
    def connected(self) -> bool:
        protocol = self._protocol
        return (protocol is not None and protocol.lost is None and protocol.transport is not None
                and not protocol.transport.is_closing())

    async def connect(self) -> None:
        """Open the socket and authenticate/select the db (no-op when connected). Nothing is sent on failure."""
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                if self.path:
                    _, protocol = await loop.create_unix_connection(RespProtocol, self.path)
                else:
                    context = ssl.create_default_context() if self.tls else None
                    _, protocol = await loop.create_connection(RespProtocol, self.host, self.port, ssl=context)
        except (OSError, TimeoutError) as error:
            raise RedisConnectFailed(f"cannot connect to Redis at {self.path or f'{self.host}:{self.port}'}: "
                                       f"{error!r}") from None
        self._protocol = protocol
        try:
            if self.password:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                await self.execute(*auth)
            if self.db:
                await self.execute("SELECT", self.db)
        except BaseException:
            self.abort()
            raise

    async def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply (at most ``timeout`` s, then the socket is closed)."""
        protocol = self._protocol
        if protocol is None:
            raise RedisUnavailable("not connected to Redis")
        waiter = protocol.send(hiredis.pack_command(args))
        # A plain timer, not asyncio.timeout(): this runs once per group commit on the hot path.
        expiry = asyncio.get_running_loop().call_later(self.timeout, self._expire, waiter)
        try:
            reply = await waiter
        except asyncio.CancelledError:
            self.abort()  # a reply we would never read must not be taken for the next command's
            raise
        finally:
            expiry.cancel()
        return _raise_reply_error(reply)

    async def execute_within(self, seconds: float, *args: Any) -> Any:
        """:meth:`execute` with its own timeout (``WAIT`` blocks on purpose for up to its own timeout)."""
        protocol = self._protocol
        if protocol is None:
            raise RedisUnavailable("not connected to Redis")
        return await self._await(protocol.send(hiredis.pack_command(args)), seconds)

    async def execute_asking(self, *args: Any) -> Any:
        """``ASKING`` and the command in one write (a Redis Cluster ``ASK`` redirection); the command's reply."""
        protocol = self._protocol
        if protocol is None:
            raise RedisUnavailable("not connected to Redis")
        asking = protocol.send(hiredis.pack_command(("ASKING",)))
        waiter = protocol.send(hiredis.pack_command(args))
        _raise_reply_error(await self._await(asking, self.timeout))
        return _raise_reply_error(await self._await(waiter, self.timeout))

    async def _await(self, waiter: asyncio.Future[Any], seconds: float) -> Any:
        expiry = asyncio.get_running_loop().call_later(seconds, self._expire, waiter)
        try:
            reply = await waiter
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            expiry.cancel()
        return _raise_reply_error(reply)

    @property
    def address(self) -> str:
        """``host:port`` (or the socket path) this connection goes to."""
        return self.path or f"{self.host}:{self.port}"

    def _expire(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_exception(RedisTimeout(f"Redis did not answer within {self.timeout} s"))
            self.abort()

    def abort(self) -> None:
        """Close the socket at once (RST); any reply still due is lost."""
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
