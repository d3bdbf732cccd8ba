"""GET / over real HTTP: the page, its headers, bad query parameters, and 503s when counts are unreadable."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from analytics_pipeline.reads import dashboard
from analytics_pipeline.reads.dashboard_model import DashboardData
from analytics_pipeline.reads.dashboard_render import SCRIPT_HASH
from analytics_pipeline.reads.dashboard_source import DashboardUnavailable


async def test_serves_the_page_with_safe_headers(make_client, provider_of, data, parse):
    client = await make_client(provider_of(data))
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html" and response.charset == "utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    csp = response.headers["Content-Security-Policy"]
    assert f"script-src '{SCRIPT_HASH}'" in csp and "default-src 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    doc = parse(await response.text())
    assert doc.one("svg", data_chart="chart-hourly").one(
        "circle", data_series="page_view", data_bucket="2026-11-27T14:00:00Z").attrs["data-count"] == "17"
    # The example command points at the address this browser used.
    host = f"{client.host}:{client.port}"
    assert f"http://{host}/v1/events" in doc.one("code", id="send-cmd").text()
    head = await client.head("/")
    assert head.status == 200


async def test_refresh_and_theme_parameters(make_client, provider_of, data, parse):
    client = await make_client(provider_of(data))
    doc = parse(await (await client.get("/?refresh=0&theme=dark")).text())
    assert doc.one("body").attrs["data-refresh"] == "0" and doc.one("html").attrs["data-theme"] == "dark"
    doc = parse(await (await client.get("/?refresh=120")).text())
    assert doc.one("body").attrs["data-refresh"] == "120"
    assert doc.one("meta", http_equiv="refresh").attrs["content"] == "120"


@pytest.mark.parametrize(("query", "field", "reason"), [
    ("refresh=abc", "refresh", "must be a whole number of seconds, got 'abc'"),
    ("refresh=2", "refresh", "must be 0 (off) or between 5 and 3600 seconds, got 2"),
    ("refresh=-1", "refresh", "must be 0 (off) or between 5 and 3600 seconds, got -1"),
    ("theme=neon", "theme", "must be one of auto, light, dark, got 'neon'"),
])
async def test_bad_parameters_are_a_400_naming_the_field(make_client, provider_of, data, query, field, reason):
    client = await make_client(provider_of(data))
    response = await client.get(f"/?{query}")
    assert response.status == 400
    body = await response.json()
    assert body["errors"] == [{"index": None, "field": field, "reason": reason}]
    assert body["message"] == f"{field}: {reason}"


@pytest.mark.parametrize("error", [DashboardUnavailable("The PostgreSQL tables do not exist yet"),
                                   redis.exceptions.ConnectionError("Connection refused"),
                                   ConnectionRefusedError(111, "refused")])
async def test_unreadable_counts_give_a_503_page_that_keeps_refreshing(make_client, error, parse):
    async def failing(app: web.Application) -> DashboardData:
        raise error

    client = await make_client(failing)
    response = await client.get("/?refresh=10")
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    doc = parse(await response.text())
    assert doc.one("section", id="error-state").one("h2").text() == "Dashboard unavailable"
    assert doc.one("body").attrs["data-refresh"] == "10"
    if isinstance(error, DashboardUnavailable):
        assert "tables do not exist yet" in doc.one("section", id="error-state").text()


async def test_a_hanging_provider_times_out_into_a_503(make_client, monkeypatch, data):
    monkeypatch.setattr(dashboard, "LOAD_TIMEOUT_SECONDS", 0.2)

    async def hanging(app: web.Application) -> DashboardData:
        await asyncio.sleep(30)
        return data

    client = await make_client(hanging)
    response = await client.get("/")
    assert response.status == 503
    assert "TimeoutError" in await response.text()


async def test_a_bug_in_the_provider_is_not_hidden_as_a_503(make_client):
    async def broken(app: web.Application) -> DashboardData:
        raise KeyError("bug")

    client = await make_client(broken)
    response = await client.get("/")
    assert response.status == 500


async def test_concurrent_loads_share_one_read(data):
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(app: web.Application) -> DashboardData:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return data

    app = web.Application()
    dashboard.setup_dashboard(app, slow, reuse_seconds=0)
    loader = app[dashboard.DASHBOARD_LOADER]
    load, joined, all_joined = loader.load, 0, asyncio.Event()

    async def counted(app: web.Application) -> DashboardData:
        nonlocal joined
        joined += 1
        if joined == 5:
            all_joined.set()
        return await load(app)

    loader.load = counted  # type: ignore[method-assign]
    async with TestClient(TestServer(app)) as client:
        pending = [asyncio.create_task(client.get("/")) for _ in range(5)]
        await asyncio.wait_for(started.wait(), 10)
        # All five joined the read while it runs: waited for, not guessed with a sleep (a loaded machine
        # could take longer than any fixed delay to get the other four requests to the handler).
        await asyncio.wait_for(all_joined.wait(), 30)
        release.set()
        assert [r.status for r in await asyncio.gather(*pending)] == [200] * 5
        assert calls == 1
        assert (await client.get("/")).status == 200
        assert calls == 2  # no reuse configured: a later load reads again


async def test_a_fresh_result_is_reused(make_client, data):
    calls = 0

    async def counting(app: web.Application) -> DashboardData:
        nonlocal calls
        calls += 1
        return data

    client = await make_client(counting)  # default REUSE_SECONDS (2 s)
    for _ in range(3):
        assert (await client.get("/")).status == 200
    assert calls == 1


async def test_without_reuse_every_load_reads_again(data):
    calls = 0

    async def counting(app: web.Application) -> DashboardData:
        nonlocal calls
        calls += 1
        return data

    app = web.Application()
    dashboard.setup_dashboard(app, counting, reuse_seconds=0)
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            assert (await client.get("/")).status == 200
    assert calls == 3


async def test_a_failed_read_is_not_reused(data):
    outcomes: list[BaseException | DashboardData] = [redis.exceptions.ConnectionError("down"), data]

    async def flaky(app: web.Application) -> DashboardData:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    app = web.Application()
    dashboard.setup_dashboard(app, flaky)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 503
        assert (await client.get("/")).status == 200


async def test_the_page_is_compressed_for_browsers_that_accept_it(make_client, provider_of, data):
    client = await make_client(provider_of(data))
    plain = await client.get("/", headers={"Accept-Encoding": "identity"}, auto_decompress=False)
    zipped = await client.get("/", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert len(await zipped.read()) * 4 < len(await plain.read())
