"""The dashboard in a real browser: headless Chromium loads the page from a real aiohttp server and the
test reads the RENDERED DOM (charts, numbers, auto-refresh, inert hostile names) and saves screenshots."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from analytics_pipeline.core.config import Config
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.reads.dashboard import DASHBOARD_LOADER, setup_dashboard
from analytics_pipeline.reads.dashboard_model import DashboardData
from analytics_pipeline.sidecar.app import create_app

pytestmark = pytest.mark.browser

HOSTILE = '<img src=x onerror="document.title=\'pwned\'">'


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free local port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_real_sidecar_page_in_chromium(config: Config, pg: asyncpg.Connection, redis_client: aioredis.Redis,
                                             chromium, parse, png, tmp_path: Path):
    app = create_app(config)
    app[DASHBOARD_LOADER].reuse_seconds = 0
    async with serving(app) as base, aiohttp.ClientSession() as http:
        empty = parse(await chromium.dump_dom(f"{base}/?refresh=0"))
        assert empty.one("div", id="app").attrs["data-empty"] == "true"
        assert "curl -X POST" in empty.one("code", id="first-event-cmd").text()

        now = datetime.now(UTC).replace(microsecond=0)
        stamp = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        batch = [{"event": "page_view", "user_id": f"u{i % 4}", "timestamp": stamp} for i in range(12)]
        batch += [{"event": "signup", "userId": "u1", "timestamp": stamp}] * 3
        async with http.post(f"{base}/v1/events", json=batch) as response:
            assert response.status == 200
        stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
        assert stats.exit_code == 0, stats.error
        async with http.post(f"{base}/v1/events", json={"event": "page_view", "user_id": "u9",
                                                          "timestamp": stamp}) as response:
            assert response.status == 200

        doc = parse(await chromium.dump_dom(f"{base}/?refresh=0"))
        shot = await chromium.screenshot(f"{base}/?refresh=0", tmp_path / "dashboard-live.png")

    hour = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:00:00Z")
    day = (now - timedelta(minutes=1)).date().isoformat()
    hourly = doc.one("svg", data_chart="chart-hourly")
    assert hourly.one("circle", data_series="page_view", data_bucket=hour).attrs["data-count"] == "13"
    assert hourly.one("circle", data_series="signup", data_bucket=hour).attrs["data-count"] == "3"
    assert hourly.one("rect", class_="band", data_bucket=hour).attrs["data-total"] == "16"
    daily = doc.one("svg", data_chart="chart-daily")
    assert {(b.attrs["data-series"], b.attrs["data-count"]) for b in daily.find_all("rect", class_="bar")} == \
        {("page_view", "13"), ("signup", "3")}
    assert doc.one("svg", data_chart="chart-uniques").one("circle", data_bucket=day).attrs["data-count"] == "5"
    assert doc.one("div", data_stat="events_24h").one("div", class_="value").text() == "16"
    assert doc.one("table", id="table-daily").one("tr", data_bucket=day).one("td", class_="total").text() == "16"
    assert png(shot) == (1400, 1800) and shot.stat().st_size > 20_000
    print(f"\n[dashboard] screenshot: {shot}")


async def test_known_data_in_chromium_refreshes_itself_and_keeps_hostile_names_inert(known, chromium, parse, png,
                                                                                     tmp_path: Path):
    base_data = known()
    calls = 0

    async def provider(app: web.Application) -> DashboardData:
        nonlocal calls
        calls += 1
        hour = base_data.now.replace(minute=0, second=0)
        hourly = {**base_data.hourly, HOSTILE: [(hour, calls)]}  # type: ignore[dict-item]
        daily = {**base_data.daily, HOSTILE: [(base_data.now.date(), calls)]}  # type: ignore[dict-item]
        return DashboardData(base_data.pipeline, base_data.now, hourly, daily, base_data.uniques)

    app = web.Application()
    setup_dashboard(app, provider, reuse_seconds=0)
    async with serving(app) as base:
        # 12 s of page time with a 5 s refresh: the inline script fetches and swaps the page twice.
        doc = parse(await chromium.dump_dom(f"{base}/?refresh=5", virtual_time_ms=12_000))
        loads_after_refresh = calls
        light = await chromium.screenshot(f"{base}/?refresh=0", tmp_path / "dashboard-light.png")
        dark = await chromium.screenshot(f"{base}/?refresh=0&theme=dark", tmp_path / "dashboard-dark.png")

    assert loads_after_refresh >= 3, "the page did not refresh itself"
    hour_key = base_data.now.strftime("%Y-%m-%dT%H:00:00Z")
    hourly = doc.one("svg", data_chart="chart-hourly")
    swapped = int(hourly.one("circle", data_series=HOSTILE, data_bucket=hour_key).attrs["data-count"])
    assert 2 <= swapped <= loads_after_refresh  # numbers of a later load than the first one
    assert "stale" not in doc.one("html").attrs.get("class", "")
    assert hourly.one("circle", data_series="page_view", data_bucket=hour_key).attrs["data-count"] == "17"
    assert [li.attrs["data-legend"] for li in doc.one("section", id="hourly").find_all("li", data_legend=True)] == \
        ["page_view", "signup", HOSTILE]
    # The hostile name is text everywhere: no element was made of it and its handler never ran.
    assert doc.find_all("img") == []
    assert doc.one("head").one("title").text() == "default/web-shop · analytics"
    assert doc.one("section", id="hourly").find_all("span", class_="name")[2].text() == HOSTILE
    assert doc.one("div", data_stat="events_30d").attrs["data-value"] == str(79 + swapped)
    for shot in (light, dark):
        assert png(shot) == (1400, 1800) and shot.stat().st_size > 20_000
    print(f"\n[dashboard] screenshots: {light} {dark}")
