"""The Grafana dashboard's SQL, run against a real PostgreSQL with the project's schema and known rows."""

from __future__ import annotations

import importlib.resources
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pytest
from support import REPO

from analytics_pipeline.flusher.partitions import PARTITIONED, ensure_partitions
from analytics_pipeline.flusher.store import PIPELINE_TABLES

DASHBOARD = REPO / "charts" / "analytics-pipeline" / "files" / "grafana-dashboard.json"
FROM, TO = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panel(title: str) -> dict[str, Any]:
    return next(item for item in dashboard()["panels"] if item["title"] == title)


def expand(sql: str, pipeline: str) -> str:
    """What Grafana's PostgreSQL datasource sends: macros and the $pipeline variable expanded."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 lambda m: f"{m[1]} BETWEEN '{FROM.isoformat()}' AND '{TO.isoformat()}'", sql)
    assert "$" not in sql.replace("$pipeline", ""), f"unexpanded macro in {sql}"
    return sql.replace("$pipeline", pipeline)


def test_dashboard_is_for_postgresql_and_uses_the_datasource_variable() -> None:
    board = dashboard()
    variables = {item["name"]: item for item in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "grafana-postgresql-datasource"
    assert {"Events per day by type", "Events per hour by type", "Daily unique users"} <= {
        item["title"] for item in board["panels"]}
    for item in board["panels"]:
        assert item["datasource"]["uid"] == "${datasource}"
        for target in item["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["rawQuery"]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection with the project's schema applied and a pipeline of this test alone (rows removed after)."""
    conn = await asyncpg.connect(database_url)
    schema = (importlib.resources.files("analytics_pipeline.core") / "schema.sql").read_text(encoding="utf-8")
    async with conn.transaction():  # idempotent; serialised by the schema's own advisory lock
        await conn.execute(schema)
    # the rows below are written directly, not by the flusher: their months' partitions first
    await ensure_partitions(conn, [(table, date(2026, month, 1)) for table in PARTITIONED for month in (3, 4)])
    pipeline = f"test/grafana-{uuid.uuid4().hex[:10]}"
    try:
        yield conn, pipeline
    finally:
        for table in PIPELINE_TABLES:
            await conn.execute(f"DELETE FROM {table} WHERE pipeline IN ($1, $2)", pipeline, f"{pipeline}-other")
        await conn.close()


async def test_panels_return_the_flushed_numbers(db: tuple[asyncpg.Connection, str]) -> None:
    conn, pipeline = db
    await conn.executemany("INSERT INTO analytics_daily (pipeline, event_type, day, count) VALUES ($1, $2, $3, $4)", [
        (pipeline, "page_view", date(2026, 3, 1), 10), (pipeline, "page_view", date(2026, 3, 2), 7),
        (pipeline, "signup", date(2026, 3, 2), 2), (pipeline, "page_view", date(2026, 4, 5), 1000),  # out of range
        (f"{pipeline}-other", "page_view", date(2026, 3, 1), 999)])  # another pipeline: not counted
    await conn.executemany("INSERT INTO analytics_hourly (pipeline, event_type, hour, count) VALUES ($1, $2, $3, $4)", [
        (pipeline, "page_view", datetime(2026, 3, 1, 9, tzinfo=UTC), 4),
        (pipeline, "page_view", datetime(2026, 3, 1, 10, tzinfo=UTC), 6)])
    await conn.executemany(
        "INSERT INTO analytics_user_daily (pipeline, user_id, event_type, day, count) VALUES ($1, $2, $3, $4, $5)", [
            (pipeline, "u1", "page_view", date(2026, 3, 1), 3), (pipeline, "u1", "signup", date(2026, 3, 1), 1),
            (pipeline, "u2", "page_view", date(2026, 3, 1), 2), (pipeline, "u3", "page_view", date(2026, 3, 2), 1)])

    async def run(title: str) -> list[asyncpg.Record]:
        return await conn.fetch(expand(panel(title)["targets"][0]["rawSql"], pipeline))

    daily = await run("Events per day by type")
    assert [(row["time"].date(), row["metric"], row["value"]) for row in daily] == [
        (date(2026, 3, 1), "page_view", 10), (date(2026, 3, 2), "page_view", 7), (date(2026, 3, 2), "signup", 2)]
    hourly = await run("Events per hour by type")
    assert [(row["time"].hour, row["value"]) for row in hourly] == [(9, 4), (10, 6)]
    uniques = await run("Daily unique users")
    assert [(row["time"].date(), row["unique users"]) for row in uniques] == [(date(2026, 3, 1), 2),
                                                                              (date(2026, 3, 2), 1)]
    assert (await run("Events in range"))[0]["events"] == 19
    assert (await run("Unique users in range"))[0]["unique users"] == 3
    assert [(row["event type"], row["events"]) for row in await run("Top event types in range")] == [
        ("page_view", 17), ("signup", 2)]
    variable = next(item for item in dashboard()["templating"]["list"] if item["name"] == "pipeline")
    assert pipeline in [row[0] for row in await conn.fetch(variable["query"])]
