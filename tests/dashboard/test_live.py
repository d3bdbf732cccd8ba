"""The real path: the sidecar app counts events in Redis, the flusher moves some into PostgreSQL, and the
dashboard shows PostgreSQL totals + what is still in Redis, exactly."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from analytics_pipeline.core.config import Config
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.reads.dashboard import DASHBOARD_LOADER
from analytics_pipeline.sidecar.app import create_app

Sent = list[tuple[str, str, datetime]]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _send(client: TestClient, events: Sent) -> None:
    body = [{"event": name, "user_id": user, "timestamp": _iso(at)} for name, user, at in events]
    response = await client.post("/v1/events", json=body)
    assert response.status == 200, await response.text()


def _expected(sent: Sent) -> tuple[Counter, Counter, dict[date, set[str]]]:
    hourly = Counter((name, at.strftime("%Y-%m-%dT%H:00:00Z")) for name, _, at in sent)
    daily = Counter((name, at.date().isoformat()) for name, _, at in sent)
    users: dict[date, set[str]] = {}
    for _, user, at in sent:
        users.setdefault(at.date(), set()).add(user)
    return hourly, daily, users


async def test_dashboard_shows_postgres_totals_plus_unflushed_redis(config: Config, pg: asyncpg.Connection,
                                                                   redis_client: aioredis.Redis, parse):
    app = create_app(config)
    app[DASHBOARD_LOADER].reuse_seconds = 0  # every GET reads the stores again
    async with TestClient(TestServer(app)) as client:
        # A fresh pipeline: the intentional empty state, read through the real query path.
        first = await client.get("/?refresh=0")
        assert first.status == 200, await first.text()
        assert parse(await first.text()).one("div", id="app").attrs["data-empty"] == "true"

        now = datetime.now(UTC).replace(microsecond=0)
        flushed: Sent = ([("page_view", f"u{i % 3}", now - timedelta(minutes=1)) for i in range(6)]
                         + [("signup", "u7", now - timedelta(hours=2))]
                         + [("page_view", "u1", now - timedelta(days=3))] * 2)
        await _send(client, flushed)
        stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
        assert stats.exit_code == 0, stats.error
        stored = await pg.fetchval("SELECT sum(count) FROM analytics_daily WHERE pipeline = $1", config.pipeline)
        assert stored == len(flushed)
        live: Sent = [("page_view", "u9", now - timedelta(minutes=1))] * 4 + [("<b>odd</b>", "u1", now)]
        await _send(client, live)

        response = await client.get("/?refresh=0")
        assert response.status == 200
        doc = parse(await response.text())

    sent = flushed + live
    hourly, daily, users = _expected(sent)
    chart = doc.one("svg", data_chart="chart-hourly")
    shown = {(d.attrs["data-series"], d.attrs["data-bucket"]): int(d.attrs["data-count"])
             for d in chart.find_all("circle", class_="dot") if d.attrs["data-count"] != "0"}
    in_window = {k: v for k, v in hourly.items() if k[1] >= (now - timedelta(hours=47)).strftime("%Y-%m-%dT%H")}
    assert shown == in_window
    bars = {(b.attrs["data-series"], b.attrs["data-bucket"]): int(b.attrs["data-count"])
            for b in doc.one("svg", data_chart="chart-daily").find_all("rect", class_="bar")}
    assert bars == dict(daily)
    dots = {d.attrs["data-bucket"]: int(d.attrs["data-count"])
            for d in doc.one("svg", data_chart="chart-uniques").find_all("circle", class_="dot")
            if d.attrs["data-count"] != "0"}
    assert dots == {day.isoformat(): len(ids) for day, ids in users.items()}
    stat = {s.attrs["data-stat"]: s.attrs.get("data-value") for s in doc.find_all("div", class_="stat")}
    assert stat["events_30d"] == str(len(sent))
    assert stat["users_window"] == str(len({user for _, user, _ in sent}))
    assert stat["event_types"] == "3"
    assert doc.one("section", id="top-events").one("tr", data_event_type="page_view").one(
        "td", data_window="30d").text().startswith(str(6 + 2 + 4))


async def test_missing_tables_give_a_503_that_says_to_migrate(config: Config, schema: str, parse):
    # A search_path without our tables: the queries fail the way they do before the first migration.
    broken = config.replace(database_url=f"{schema}?search_path=dashboard_no_such_schema")
    app = create_app(broken)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/")
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        text = parse(await response.text()).one("section", id="error-state").text()
        assert "run `analytics-pipeline migrate`" in text


async def test_unreachable_redis_gives_a_503_page(config: Config, schema: str, parse):
    app = create_app(config.replace(redis_url="redis://127.0.0.1:1/0"))
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/?refresh=15")
        assert response.status == 503
        doc = parse(await response.text())
        assert "ConnectionError" in doc.one("section", id="error-state").text()
        assert doc.one("body").attrs["data-refresh"] == "15"
