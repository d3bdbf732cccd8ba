"""HTTP connection hygiene of the sidecar's server: timeouts for idle and slow clients, quiet logs for bad HTTP.

aiohttp's defaults keep an idle keep-alive connection for 3,630 s, never time out a client that dribbles
its request headers, and log every malformed request with a full traceback at ERROR (a log flood anyone
can cause). :func:`make_runner` builds the AppRunner with ``server.keepalive_timeout_seconds``, closes a
connection whose request line and headers are not complete ``server.header_timeout_seconds`` after their
first byte (408, JSON), and logs malformed requests as one WARNING line, at most
``server.bad_request_logs_per_minute`` a minute (the rest counted in a metric and the next line).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter

from analytics_pipeline.core.config import ServerConfig

from .appkeys import REGISTRY

log = logging.getLogger(__name__)
AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")

_TIMEOUT_BODY = orjson.dumps({"error": "request_timeout", "message": "the request line and headers did not arrive "
                              "in time (server.header_timeout_seconds)", "errors": []})
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class BadRequestLog:
    """Stands in for aiohttp's server logger: malformed HTTP becomes one rate-limited WARNING line without a
    traceback; anything else (a bug in a handler) still goes to aiohttp's logger with its traceback."""

    def __init__(self, per_minute: int, counter: Counter) -> None:
        self.per_minute = per_minute
        self.counter = counter
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def bad_request(self, reason: str, detail: str, peer: object) -> None:
        """Count one bad request and log it unless this minute's quota is used up."""
        self.counter.labels(reason).inc()
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start, self._logged = now, 0
        if self._logged >= self.per_minute:
            self._suppressed += 1
            return
        self._logged += 1
        suppressed, self._suppressed = self._suppressed, 0
        log.warning("bad HTTP request from %s: %s%s", peer, detail,
                    f" ({suppressed} more not logged in the last minute)" if suppressed else "",
                    extra={"event": "bad_http_request", "reason": reason, "suppressed": suppressed})

    def exception(self, message: str, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(error, HttpProcessingError):
            peer = args[0] if args else "?"
            self.bad_request("malformed", " ".join(f"{type(error).__name__}: {error}".split())[:300], peer)
            return
        AIOHTTP_SERVER_LOG.exception(message, *args, exc_info=exc_info, **kwargs)

    def __getattr__(self, name: str) -> Any:  # debug(), warning(), ... as aiohttp's logger does them
        return getattr(AIOHTTP_SERVER_LOG, name)


class _HeaderTimeoutHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline for a request's line and headers."""

    header_timeout = 10.0
    bad_requests: BadRequestLog | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def _headers_pending(self) -> bool:
        """Waiting for a request's headers: no parsed request queued or running, and the connection idle
        (``start()`` awaits the next message, or has not begun on a new connection)."""
        idle = self._waiter is not None or self._request_count == 0
        return idle and not self._messages and not self._request_in_progress and self._payload_parser is None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # The usual case first, with one attribute test on the hot path: the chunk completed a request.
        if self._messages or self._force_close or self._close or not self._headers_pending():
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif self._header_timer is None:  # first bytes of a request: its headers must follow in time
            self._header_timer = self._loop.call_later(self.header_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport is None or not self._headers_pending():
            return
        if self.bad_requests is not None:
            self.bad_requests.bad_request("header_timeout", f"request headers incomplete after "
                                          f"{self.header_timeout:g} s; closed (408)", self.peername)
        self.transport.write(TIMEOUT_RESPONSE)
        self.force_close()
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


class _Server(web.Server):
    """Creates :class:`_HeaderTimeoutHandler` connections instead of aiohttp's plain ones."""

    header_timeout = 10.0
    bad_requests: BadRequestLog | None = None

    def __call__(self) -> RequestHandler:
        handler = _HeaderTimeoutHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        handler.bad_requests = self.bad_requests
        return handler


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, server: ServerConfig, bad_requests: BadRequestLog, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=server.keepalive_timeout_seconds, logger=bad_requests, **kwargs)
        self._header_timeout = server.header_timeout_seconds
        self._bad_requests = bad_requests

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        made.__class__ = _Server  # same object, our protocol factory (tested: test_connections.py)
        assert isinstance(made, _Server)
        made.header_timeout = self._header_timeout
        made.bad_requests = self._bad_requests
        return made


BAD_REQUESTS = web.AppKey("bad_requests", BadRequestLog)


def make_runner(app: web.Application, server: ServerConfig, **kwargs: Any) -> web.AppRunner:
    """The AppRunner of ``app`` with the connection timeouts and quiet bad-request logs of ``server``.

    One :class:`BadRequestLog` (metric and log quota) per app and the apps that copy its keys (the probe
    listener's app shares the main app's registry)."""
    if BAD_REQUESTS not in app:
        counter = Counter("analytics_sidecar_bad_http_requests", "Malformed HTTP requests and header timeouts, "
                          "by reason", ["reason"], registry=app[REGISTRY])
        for reason in ("malformed", "header_timeout"):
            counter.labels(reason)
        app[BAD_REQUESTS] = BadRequestLog(server.bad_request_logs_per_minute, counter)
    return _Runner(app, server, app[BAD_REQUESTS], **kwargs)
