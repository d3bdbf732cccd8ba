"""The 200 the sidecar writes in one piece is byte for byte what aiohttp's own Response would send.

The reference is a plain aiohttp app answering the same body with ``web.Response``; both are asked
over raw sockets (keep-alive, Connection: close, HTTP/1.0 with and without keep-alive, pipelining),
and the answers must be identical apart from the Date header's value.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sidecar_helpers import SidecarFactory

from analytics_pipeline.core.config import Config
from analytics_pipeline.sidecar.app import create_app

BODY = b'{"event":"page_view","user_id":"u1"}'


def request(version: str = "1.1", headers: str = "") -> bytes:
    return (f"POST /v1/events HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n{headers}\r\n").encode() + BODY


async def exchange(port: int, *requests: bytes) -> tuple[list[bytes], bool]:
    """Send the requests (pipelined in one write), read one answer each; also whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(requests))
        answers = []
        for _ in requests:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            answers.append(head + await reader.readexactly(length))
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        return [re.sub(rb"Date: [^\r]+", b"Date: *", answer) for answer in answers], closed
    finally:
        writer.close()


@pytest.fixture
async def reference_port() -> AsyncIterator[int]:
    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200, body=b'{"accepted":1,"duplicates":0}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/events", accept)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server.port  # type: ignore[misc]
    await server.close()


@pytest.mark.parametrize(("version", "headers"), [
    ("1.1", ""), ("1.1", "Connection: close\r\n"), ("1.1", "Connection: keep-alive\r\n"),
    ("1.0", ""), ("1.0", "Connection: keep-alive\r\n"), ("1.0", "Connection: close\r\n"),
])
async def test_same_bytes_as_aiohttp(start_sidecar: SidecarFactory, config: Config, redis_client,
                                     reference_port: int, version: str, headers: str) -> None:
    sidecar = await start_sidecar(config)
    ours = await exchange(sidecar.server.port, request(version, headers))  # type: ignore[arg-type]
    theirs = await exchange(reference_port, request(version, headers))
    assert ours == theirs
    assert ours[0][0].startswith(f"HTTP/{version} 200 OK\r\n".encode())


async def test_an_aiohttp_without_the_internals_gets_its_general_path(
        start_sidecar: SidecarFactory, config: Config, redis_client, reference_port: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from analytics_pipeline.sidecar import accepted

    monkeypatch.setattr(accepted, "_INTERNALS_PRESENT", False)
    written: list[bytes] = []
    monkeypatch.setattr(accepted._HeadCache, "get", lambda *args: written.append(b"") or b"")  # must not be used
    sidecar = await start_sidecar(config)
    ours = await exchange(sidecar.server.port, request())  # type: ignore[arg-type]
    assert ours == await exchange(reference_port, request())
    assert written == []


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
        start_sidecar: SidecarFactory, config: Config, redis_client, reference_port: int) -> None:
    sidecar = await start_sidecar(config)
    requests = [request(), request(), request(headers="Connection: close\r\n")]
    ours = await exchange(sidecar.server.port, *requests)  # type: ignore[arg-type]
    assert ours == await exchange(reference_port, *requests)
    assert len(ours[0]) == 3 and ours[1] is True  # closed after the third, as asked


async def test_a_prepare_signal_still_sees_and_changes_the_answer(config: Config, redis_client) -> None:
    seen: list[int] = []

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(response.status)
        response.headers["X-Stamp"] = "1"

    app = create_app(config)
    app.on_response_prepare.append(stamp)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        (answer,), _ = await exchange(server.port, request())  # type: ignore[arg-type]
    finally:
        await server.close()
    assert seen == [200] and b"\r\nX-Stamp: 1\r\n" in answer and answer.endswith(b'{"accepted":1,"duplicates":0}')


def test_the_date_header_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from analytics_pipeline.sidecar import accepted

    now = ["Sat, 28 Nov 2026 01:00:00 GMT"]
    monkeypatch.setattr(accepted, "rfc822_formatted_time", lambda: now[0])
    cache = accepted._HeadCache()
    assert b"\r\nDate: Sat, 28 Nov 2026 01:00:00 GMT\r\n" in cache.get(1, True, 29)
    now[0] = "Sat, 28 Nov 2026 01:00:01 GMT"
    assert b"\r\nDate: Sat, 28 Nov 2026 01:00:01 GMT\r\n" in cache.get(1, True, 29)
    assert b"\r\nContent-Length: 31\r\n" in cache.get(1, True, 31)
