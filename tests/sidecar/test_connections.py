"""HTTP connection hygiene of the served sidecar, over raw sockets: idle keep-alive and header-read timeouts
close connections (408 JSON for slow headers), malformed requests are one rate-limited log line each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from sidecar_helpers import first_event_accepted

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.services import free_port
from analytics_pipeline.sidecar.server import serve

WAIT_S = 30.0  # how long a test waits for the server to act: a bound for hangs, not a speed assertion
EVENT = b'{"event": "view"}'
REQUEST = (b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(EVENT), EVENT))


@contextlib.asynccontextmanager
async def served(config: Config) -> AsyncIterator[int]:
    """serve() (the real server set-up) on a free port until the block ends; yields the port."""
    port = free_port()
    config = config.replace(server={**config.as_dict()["server"], "port": port})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop))
    try:
        assert await first_event_accepted(port, 200, 0.05)
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), WAIT_S)


async def test_slow_headers_get_408_and_the_connection_closed(sidecar_config: Callable[..., Config],
                                                              redis_client) -> None:  # type: ignore[no-untyped-def]
    async with served(sidecar_config(server={"header_timeout_seconds": 0.5})) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n")
            dribble = asyncio.create_task(_dribble(writer))  # a header byte now and then does not extend it
            answer = await _closed(reader)
            dribble.cancel()
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert orjson.loads(body)["error"] == "request_timeout"


async def _dribble(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while True:
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.1)


async def test_idle_keepalive_connection_is_closed_but_not_by_the_header_timeout(
        sidecar_config: Callable[..., Config], redis_client) -> None:  # type: ignore[no-untyped-def]
    config = sidecar_config(server={"keepalive_timeout_seconds": 3.0, "header_timeout_seconds": 0.2})
    async with served(config) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):  # idle longer than the header timeout between requests: still served
                writer.write(REQUEST)
                assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)).startswith(b"HTTP/1.1 200")
                await asyncio.wait_for(reader.readuntil(b"}"), WAIT_S)
                await asyncio.sleep(0.5)
            assert await _closed(reader) == b""  # then closed once idle for keepalive_timeout_seconds
        finally:
            writer.close()


async def test_malformed_requests_are_one_rate_limited_line_each(
        sidecar_config: Callable[..., Config], redis_client,  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with served(sidecar_config(server={"bad_request_logs_per_minute": 3})) as port:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n")
            answer = await _closed(reader)
            writer.close()
            assert answer.split(b" ", 2)[1] == b"400"
        metrics = await _get(port, b"/metrics")
    assert b'analytics_sidecar_bad_http_requests_total{reason="malformed"} 10.0' in metrics
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == []  # no traceback, nothing at ERROR
    lines = [r for r in caplog.records if getattr(r, "event", None) == "bad_http_request"]
    assert len(lines) == 3 and all(r.levelno == logging.WARNING for r in lines)
    assert all("\n" not in r.getMessage() and "Content-Length" in r.getMessage() for r in lines)


async def _get(port: int, path: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    try:
        return await _closed(reader)
    finally:
        writer.close()


async def test_the_probe_listener_has_the_same_header_timeout(sidecar_config: Callable[..., Config],
                                                              redis_client) -> None:  # type: ignore[no-untyped-def]
    """The probe listener faces the pod network: a client dribbling headers there is cut off too."""
    health_port = free_port()
    config = sidecar_config(server={"header_timeout_seconds": 0.5, "health_host": "127.0.0.1",
                                    "health_port": health_port})
    async with served(config):
        reader, writer = await asyncio.open_connection("127.0.0.1", health_port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
            answer = await _closed(reader)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
