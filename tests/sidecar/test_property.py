"""Property: whatever the body, the answer is 200 or 4xx (never 5xx), and Redis holds exactly what was accepted."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.app import create_app


class ThreadedSidecar:
    """A sidecar served from a background event loop, so a synchronous hypothesis test can call it."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = create_app(config)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def post(self, path: str, body: bytes, content_type: str | None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def threaded_sidecar(sidecar_config, redis_url: str, keys: PipelineKeys) -> Iterator[tuple[ThreadedSidecar, Any]]:
    sidecar = ThreadedSidecar(sidecar_config(ingest={"max_batch_events": 6, "max_request_bytes": 4096,
                                                     "max_event_bytes": 512}))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield sidecar, client
    finally:
        sidecar.close()
        stale = list(client.scan_iter(match=keys.scan_pattern, count=1000))
        if stale:
            client.delete(*stale)
        client.close()


# --------------------------------------------------------------------------------- strategies
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
names = st.sampled_from(["page_view", "click", "$pageview", "Signed Up"]) | st.text(max_size=140)
ids = st.sampled_from(["m1", "m2", "m3", "u1", ""]) | st.text(max_size=300)


def _moment(offset: int) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat()


timestamps = st.builds(_moment, st.integers(min_value=-9 * 86400, max_value=900)) | st.sampled_from(
    ["2026-13-01T00:00:00Z", "now", "2026-11-27", "1970-01-01T00:00:00Z"])
events = st.fixed_dictionaries({}, optional={
    "event": names | json_values, "user_id": ids | json_values, "userId": ids, "anonymousId": ids,
    "distinct_id": ids, "message_id": ids | json_values, "messageId": ids, "uuid": ids,
    "type": st.sampled_from(["track", "page", "screen", "identify", "capture", "bogus"]) | json_values,
    "timestamp": timestamps | json_values, "properties": st.dictionaries(st.text(max_size=6), json_values,
                                                                         max_size=3) | json_values})
valid_events = st.fixed_dictionaries({"event": st.sampled_from(["page_view", "click"])}, optional={
    "user_id": st.sampled_from(["u1", "u2"]), "message_id": st.sampled_from(["m1", "m2", "m3", "m4"]),
    "timestamp": st.builds(_moment, st.integers(min_value=-3 * 86400, max_value=200))})
documents = (events | st.lists(events | valid_events, max_size=8) | st.lists(valid_events, min_size=1, max_size=8)
             | st.fixed_dictionaries({"batch": st.lists(events | valid_events, max_size=8)}) | json_values)
bodies = documents.map(orjson.dumps) | st.binary(max_size=300) | st.sampled_from(
    [b"", b"{", b'{"event": NaN}', b'{"event": "a", "n": 1e999}', b"[" * 600 + b"]" * 600,
     b'{"batch": [' + b'{"event": "a"},' * 9 + b'{"event": "a"}]}', b'{"event": "' + b"x" * 5000 + b'"}'])
paths = st.sampled_from(["/v1/events", "/v1/events", "/v1/track", "/v1/batch", "/v1/identify", "/batch/",
                         "/e/", "/i/v1/analytics/events"])
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None,
                                 "application/xml", "multipart/form-data"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(path=paths, body=bodies, content_type=content_types)
def test_any_body_gets_200_or_4xx_and_redis_matches_accepted(
        threaded_sidecar: tuple[ThreadedSidecar, Any], keys: PipelineKeys, path: str, body: bytes,
        content_type: str | None) -> None:
    sidecar, client = threaded_sidecar
    accepted_so_far = getattr(sidecar, "accepted", 0)
    status, _headers, raw = sidecar.post(path, body, content_type)
    event(f"HTTP {status}")
    assert status == 200 or 400 <= status < 500, (status, raw)
    answer = orjson.loads(raw)
    if status == 200:
        assert {"accepted", "duplicates"} <= set(answer) <= {"accepted", "duplicates", "success", "status",
                                                             "results", "rejected", "message", "not_counted"}
        assert all(set(error) == {"index", "field", "reason"} for error in answer.get("rejected", []))
        accepted_so_far += answer["accepted"]
        sidecar.accepted = accepted_so_far  # type: ignore[attr-defined]
    else:
        assert answer["errors"] and answer["message"], answer
        assert all(set(error) == {"index", "field", "reason"} for error in answer["errors"])
    for kind in ("d", "h"):
        total = 0
        for key in client.scan_iter(match=keys.scan_pattern[:-1] + f"{kind}:*", count=1000):
            total += sum(int(value) for value in client.hvals(key))
        assert total == accepted_so_far
