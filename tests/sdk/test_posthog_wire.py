"""PostHog's routes and body encodings, fed with what real PostHog clients sent.

- posthog-js (the browser SDK), recorded once into tests/sdk/fixtures/ by recorder/record_posthog_js.js:
  1.50.0 offered gzip-js (``?compression=gzip-js``, gzip body as text/plain, no Content-Encoding),
  lz64 (form ``data=<lz-string base64>&compression=lz64``) and base64 (form ``data=<base64>``), plus its
  ``/engage/`` people call; 1.449.2 (today's) gzips with neither a query parameter nor a header.
- posthog-node and posthog (Python, v0 and capture_mode="v1"), recorded live by each test run: the SDK
  talks to a small recording server, and its requests are replayed byte for byte to the sidecar.

Each recorded request is sent to every PostHog event route; the sidecar must answer 200 with
``"status": 1`` and count exactly the events the recording holds (decoded independently by the
recorder: Node's zlib and the npm lz-string), minus the person/group calls that are not counted.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from python_sdks import run_python_sdk
from sdk_support import FIXTURES, Call, LiveSidecar, run_node

import analytics_pipeline.core.events as events_module

EVENT_ROUTES = ["/capture/", "/capture", "/e/", "/e", "/i/v0/e/", "/track/", "/batch/"]
JS_ROUTES = EVENT_ROUTES  # posthog-js posts to /e/; PostHog's /batch/ takes the same bodies
NOT_COUNTED = {"$identify", "$set", "$create_alias", "$groupidentify", None}
RECORDINGS = sorted(path.name for path in FIXTURES.glob("posthog-js-*.json"))


async def post(sidecar: LiveSidecar, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """POST raw bytes with exactly ``headers`` (aiohttp adds no Content-Type of its own)."""
    async with aiohttp.ClientSession() as session, session.post(
            sidecar.url + path, data=body, headers=headers, skip_auto_headers=("Content-Type",)) as response:
        text = await response.read()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


def route_for(recorded_path: str, route: str) -> str:
    """The recorded request's query string on ``route`` (``/engage/`` requests stay on /engage/)."""
    path, _, query = recorded_path.partition("?")
    target = "/engage/" if path.startswith("/engage") else route
    return target + ("?" + query if query else "")


def counted(requests: list[dict[str, Any]]) -> dict[str, int]:
    """What the default config counts of recorded requests: their events, less person/group calls
    (``/engage/`` is a person update: PostHog itself files it as ``$identify``)."""
    return dict(Counter(e["event"] for r in requests if not r["path"].startswith("/engage")
                        for e in r["events"] if e["event"] not in NOT_COUNTED))


@pytest.fixture
def recorded_clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``recorded_clock(iso)``: the validator's "now" set to a few minutes after a recording was made, so
    the recorded timestamps (kept byte for byte) stay within the counter TTL however old the fixture is."""

    def set_clock(recorded_at: str) -> None:
        moment = datetime.fromisoformat(recorded_at.replace("Z", "+00:00")) + timedelta(minutes=5)

        class Recorded(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                return moment.astimezone(tz) if tz else moment.replace(tzinfo=None)

        monkeypatch.setattr(events_module, "datetime", Recorded)

    return set_clock


@pytest.mark.parametrize("route", JS_ROUTES)
@pytest.mark.parametrize("recording", RECORDINGS)
async def test_recorded_posthog_js_request_on_every_route(recording: str, route: str, recorded_clock,
                                                          start_sidecar, sdk_config) -> None:  # type: ignore[no-untyped-def]
    fixture = json.loads((FIXTURES / recording).read_text())
    recorded_clock(fixture["recorded_at"])
    sidecar = await start_sidecar(sdk_config())
    for request in fixture["requests"]:
        status, body = await post(sidecar, route_for(request["path"], route),
                                  base64.b64decode(request["body_base64"]), request["headers"])
        assert status == 200 and isinstance(body, dict) and body.get("status") == 1, (request["path"], status, body)
    expected = counted(fixture["requests"])
    assert sum(expected.values()) == 4  # signup, purchase x2, $pageview
    assert await sidecar.wait_totals(expected) == expected


async def test_lz64_named_in_the_query_string(recorded_clock, start_sidecar, sdk_config) -> None:  # type: ignore[no-untyped-def]
    """``?compression=lz64`` in the URL, the lz-string text as the form's ``data`` (the recorded bytes of
    posthog-js 1.50.0 with the parameter moved from the form to the query string, as other clients send it)."""
    fixture = json.loads((FIXTURES / "posthog-js-1.50.0-lz64.json").read_text())
    recorded_clock(fixture["recorded_at"])
    sidecar = await start_sidecar(sdk_config())
    for request in fixture["requests"]:
        body = base64.b64decode(request["body_base64"])
        if b"&compression=lz64" not in body:
            continue
        path = request["path"].split("?")[0] + "?compression=lz64"
        status, answer = await post(sidecar, path, body.replace(b"&compression=lz64", b""), request["headers"])
        assert status == 200 and answer["status"] == 1, answer
    expected = counted([r for r in fixture["requests"] if b"compression=lz64" in base64.b64decode(r["body_base64"])])
    assert await sidecar.wait_totals(expected) == expected


# ------------------------------------------------------------------ server SDKs, recorded live
class Recorder:
    """A stand-in PostHog that answers 200 as PostHog does and keeps each request's bytes and headers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "content-encoding")}
        self.requests.append((request.path_qs, headers, body))
        if request.path.startswith("/i/v1/"):
            events = json.loads(zlib.decompress(body, 31) if headers.get("Content-Encoding") == "gzip" else body)
            return web.json_response({"results": {e["uuid"]: {"result": "ok"} for e in events["batch"]}})
        return web.json_response({"status": 1})


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    recording = Recorder()
    # The bytes as sent: aiohttp would otherwise inflate a gzip body before the handler reads it.
    app = web.Application(client_max_size=2**22, handler_args={"auto_decompress": False})
    app.router.add_post("/{tail:.*}", recording.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield recording, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def small_workload() -> list[Call]:
    at = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return [Call("track", "user-1", at, event="signup"), Call("track", "user-2", at, event="purchase"),
            Call("page", "user-1", at, name="home"), Call("track", "user-2", at, event="purchase"),
            Call("identify", "user-1", at), Call("group", "user-1", at, target="org-1"),
            Call("alias", "user-1", at, target="anon-1")]


async def record_server_sdk(sdk: str, recorder: tuple[Recorder, str], request: pytest.FixtureRequest
                            ) -> list[tuple[str, dict[str, str], bytes]]:
    recording, url = recorder
    if sdk == "posthog-node":
        request.getfixturevalue("node_sdks")
        report = await run_node("posthog", url, small_workload())
        assert report.errors == []
    else:
        run = await asyncio.wait_for(asyncio.to_thread(run_python_sdk, sdk, url, small_workload()), 120)
        assert run.errors == []
    assert recording.requests
    return recording.requests


SERVER_SDK_ROUTES = [("posthog-node", route) for route in EVENT_ROUTES] + \
    [("posthog-python", route) for route in EVENT_ROUTES] + [("posthog-python-v1", "/i/v1/analytics/events")]


@pytest.mark.parametrize(("sdk", "route"), SERVER_SDK_ROUTES)
async def test_recorded_server_sdk_request_on_every_route(sdk: str, route: str, recorder,
                                                          request: pytest.FixtureRequest,
                                                          start_sidecar, sdk_config) -> None:  # type: ignore[no-untyped-def]
    recorded = await record_server_sdk(sdk, recorder, request)
    sidecar = await start_sidecar(sdk_config())
    for path, headers, body in recorded:
        assert path.split("?")[0] == ("/i/v1/analytics/events" if sdk.endswith("v1") else "/batch/")
        if sdk == "posthog-node":
            assert headers.get("Content-Encoding") == "gzip"  # posthog-node gzips by default
        status, answer = await post(sidecar, route, body, headers)
        assert status == 200, answer
        if sdk.endswith("v1"):
            sent = json.loads(zlib.decompress(body, 31) if headers.get("Content-Encoding") == "gzip" else body)
            # Capture v1: a result per event uuid, absent meaning accepted (posthog/capture_v1.py).
            assert isinstance(answer["results"], dict) and len(sent["batch"]) == 7
            assert all(r["result"] == "ok" for r in answer["results"].values()), answer
        else:
            assert answer["status"] == 1
    expected = {"signup": 1, "purchase": 2, "$pageview": 1}
    assert await sidecar.wait_totals(expected) == expected


# --------------------------------------------------------------------------------- zip bombs
def bomb(size: int = 64 * 2**20) -> bytes:
    """A gzip stream of ``size`` zero bytes (~64 KiB compressed for 64 MiB: far under the body limit)."""
    return gzip.compress(b"\0" * size, compresslevel=9)


async def lz64_bomb(node_modules: Path, size: int = 2**20) -> bytes:
    """``size`` characters compressed by the npm lz-string (as posthog-js did): 1 MiB in ~2.3 KiB of base64
    text (lz-string needs seconds for more: its phrases grow with the square root of the input)."""
    script = f"process.stdout.write(require('lz-string').compressToBase64('a'.repeat({size})))"
    process = await asyncio.create_subprocess_exec("node", "-e", script, cwd=node_modules.parent,
                                                   stdout=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0 and stdout
    return stdout


@pytest.mark.parametrize("how", ["gzip", "deflate", "gzip-js", "sniffed", "lz64"])
async def test_zip_bomb_refused_with_413(how: str, request: pytest.FixtureRequest,
                                         start_sidecar, sdk_config) -> None:  # type: ignore[no-untyped-def]
    """A small body that inflates to 1-64 MiB: refused with 413 once the inflated bytes pass the body limit,
    nothing counted (Content-Encoding gzip/deflate on the Segment route, PostHog's gzip-js, sniffed gzip
    and lz64)."""
    config = sdk_config()
    sidecar = await start_sidecar(config)
    payload = bomb()
    if how == "deflate":
        payload = zlib.compress(b"\0" * 64 * 2**20, 9)
    elif how == "lz64":
        payload = await lz64_bomb(request.getfixturevalue("node_sdks"))
    assert len(payload) < config.ingest.max_request_bytes
    if how in ("gzip", "deflate"):
        status, answer = await post(sidecar, "/v1/batch", payload,
                                    {"Content-Type": "application/json", "Content-Encoding": how})
    elif how == "gzip-js":
        status, answer = await post(sidecar, "/e/?compression=gzip-js", payload, {"Content-Type": "text/plain"})
    elif how == "lz64":
        status, answer = await post(sidecar, "/e/?compression=lz64", payload, {"Content-Type": "text/plain"})
    else:
        status, answer = await post(sidecar, "/batch/", payload, {"Content-Type": "text/plain"})
    assert status == 413, answer
    assert await sidecar.event_totals() == {}
