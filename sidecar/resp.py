"""A minimal Redis connection for the group committer's hot path: one socket, hiredis parsing, no retries.

redis-py's asyncio connection spends ~50 µs of Python per command (a task per send, health
checks, pool bookkeeping); the committer sends one command per group commit and needs to know
exactly when a command may have reached the server, so it talks RESP itself over an
``asyncio.Protocol``. URL parsing (``redis://``, ``rediss://``, ``unix://``, user, password, db)
is redis-py's.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


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
                self._fail(RedisConnectionError(f"protocol error from Redis: {error}"))
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
        self.lost = RedisConnectionError(f"connection to Redis lost: {exc or 'closed by server'}")
        self._fail(self.lost)

    def _fail(self, error: BaseException) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (a ReplyError object for error replies)."""
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("not connected to Redis")
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        self.transport.write(packed)
        return waiter


def _raise_reply_error(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if text.startswith("NOSCRIPT"):
            raise NoScriptError(text)
        raise ResponseError(text)
    return reply


class RespConnection:
    """One Redis connection: ``connect()``, ``execute(*args)`` with a timeout, ``abort()``.

    ``execute`` raises redis-py's exception types: ``TimeoutError`` / ``ConnectionError`` (the command
    may or may not have run), ``ResponseError`` / ``NoScriptError`` (it was refused).
    """

    def __init__(self, url: str, timeout: float) -> None:
        options = parse_url(url)
        self.timeout = timeout
        self.host = options.get("host", "127.0.0.1")
        self.port = int(options.get("port", 6379))
        self.path = options.get("path") if options.get("connection_class") is UnixDomainSocketConnection else None
        self.tls = options.get("connection_class") is SSLConnection
        self.username = options.get("username")
        self.password = options.get("password")
        self.db = int(options.get("db", 0) or 0)
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
            raise RedisConnectionError(f"cannot connect to Redis at {self.path or f'{self.host}:{self.port}'}: "
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
            raise RedisConnectionError("not connected to Redis")
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

    def _expire(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_exception(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))
            self.abort()

    def abort(self) -> None:
        """Close the socket at once (RST); any reply still due is lost."""
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
