"""``analytics-pipeline demo``: the real command end to end (quick mode), its self-check, and its parts.

The end-to-end tests run ``python -m analytics_pipeline demo --quick --json`` as a subprocess against
the session's Redis and PostgreSQL and then look at the stores themselves, so they do not only
trust the demo's own report.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from support import run_demo

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.demo_check import Tally, Window, compare, expected_tally, storage_split
from analytics_pipeline.demo_report import box_table
from analytics_pipeline.demo_stack import DemoError, choose_port, remove_pipeline_data
from analytics_pipeline.demo_traffic import WINDOW, DemoEvent, build_plan, daily_rhythm
from analytics_pipeline.flusher.migrate import apply_schema
from analytics_pipeline.flusher.partitions import ensure_partitions

NOW = datetime(2026, 11, 27, 15, 30, tzinfo=UTC)


async def stored(redis_url: str, database_url: str, pipeline: str) -> dict[str, Any]:
    """What the stores hold for ``pipeline``, read directly (not through the query module)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    conn = await asyncpg.connect(database_url)
    try:
        keys = [key async for key in client.scan_iter(match=PipelineKeys(pipeline).scan_pattern, count=1000)]
        total = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM analytics_daily WHERE pipeline = $1",
                                    pipeline)
        hourly = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM analytics_hourly WHERE pipeline = $1",
                                     pipeline)
        users = await conn.fetch("SELECT day::text AS day, count(DISTINCT user_id) AS n FROM analytics_user_daily "
                                 "WHERE pipeline = $1 GROUP BY day", pipeline)
        rows = await conn.fetchval(
            "SELECT (SELECT count(*) FROM analytics_daily WHERE pipeline = $1) + (SELECT count(*) FROM "
            "analytics_hourly WHERE pipeline = $1) + (SELECT count(*) FROM analytics_user_daily WHERE pipeline = $1)"
            " + (SELECT count(*) FROM analytics_flush_ledger WHERE pipeline = $1)", pipeline)
        registered = await client.sismember(PIPELINES_SET, pipeline)
        return {"keys": keys, "total": int(total), "hourly": int(hourly), "rows": int(rows),
                "users": {r["day"]: int(r["n"]) for r in users}, "registered": bool(registered)}
    finally:
        await conn.close()
        await client.aclose()


async def cleanup(redis_url: str, database_url: str, pipeline: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    conn = await asyncpg.connect(database_url)
    try:
        await remove_pipeline_data(client, conn, pipeline)
    finally:
        await conn.close()
        await client.aclose()


# ------------------------------------------------------------------------------------------ end to end
async def test_quick_demo_passes_its_self_check_and_leaves_nothing_behind(redis_url: str, database_url: str) -> None:
    result, summary = run_demo(redis_url, database_url)
    assert result.returncode == 0, result.stderr
    assert summary["ok"] is True and summary["diff"] == []
    sent, expected, observed = summary["sent"], summary["expected"], summary["observed"]
    # What the query path reports is exactly what was acknowledged, each message_id once.
    assert sent["unique_events"] == sent["acked_unique"] == expected["total"] == observed["total"] == 2000
    for part in ("types", "types_hourly", "days", "hours", "users", "distinct_users"):
        assert observed[part] == expected[part], part
    assert sum(expected["days"].values()) == sum(expected["hours"].values()) == 2000
    assert len(expected["types"]) == 8 and len(expected["days"]) >= 2
    # Retried duplicates were really sent and the sidecar counted each once.
    assert sent["duplicate_sends"] > 0
    assert sent["event_sends"] == sent["unique_events"] + sent["duplicate_sends"]
    assert sent["accepted"] == sent["unique_events"] and sent["duplicates_reported"] == sent["duplicate_sends"]
    assert set(sent["requests_by_path"]) == {"/v1/events", "/v1/track", "/v1/batch", "/batch"}
    # Two flushes while events arrived, then a final one; at the check the counts were in both stores.
    flushes = summary["flushes"]
    assert len(flushes) >= 3 and all(f["error"] is None for f in flushes)
    assert sum(1 for f in flushes[:-1] if f["acked_at_start"] < sent["unique_events"]) >= 2
    at_check, after = summary["storage"]["at_check"], summary["storage"]["after_final_flush"]
    assert at_check["postgresql"] > 0 and at_check["redis_live"] > 0
    assert at_check["postgresql"] + at_check["redis_live"] == 2000
    assert after == {"postgresql": 2000, "redis_live": 0, "redis_inflight_units": 0, "total": 2000}
    assert summary["live_samples"]["count"] > 0 and summary["live_samples"]["violations"] == []
    assert summary["final_flush_samples"]["count"] > 0 and summary["final_flush_samples"]["violations"] == []
    assert summary["dashboard_status"] == 200
    assert summary["dashboard_url"].startswith("http://127.0.0.1:")
    # Progress on stderr says what it used and did.
    assert "from REDIS_URL" in result.stderr and "flush #2" in result.stderr and "PASS" in result.stderr
    # Its fresh pipeline is gone from both stores afterwards.
    left = await stored(redis_url, database_url, summary["pipeline"])
    assert left["keys"] == [] and left["rows"] == 0 and not left["registered"]


async def test_failed_self_check_exits_nonzero_with_a_diff(redis_url: str, database_url: str) -> None:
    """--inject-mismatch (a test hook) sends one event the demo's bookkeeping does not record."""
    result, summary = run_demo(redis_url, database_url, "--inject-mismatch")
    pipeline = summary["pipeline"]
    try:
        assert result.returncode == 1, result.stderr
        assert summary["ok"] is False
        assert any("event type purchase" in line and "(+1)" in line for line in summary["diff"])
        assert any(line.startswith("HTTP /v1:") for line in summary["diff"])
        assert summary["observed"]["total"] == summary["expected"]["total"] + 1
        # The stores really hold the extra event (the demo read them, it did not make the +1 up) and
        # the data is kept for inspection because the stores are shared.
        held = await stored(redis_url, database_url, pipeline)
        assert held["total"] == held["hourly"] == summary["expected"]["total"] + 1
        assert held["users"] == summary["observed"]["users"]
        assert "FAIL" in result.stderr and pipeline in result.stderr
    finally:
        await cleanup(redis_url, database_url, pipeline)


async def test_demo_catches_double_counting_when_dedup_is_switched_off(redis_url: str, database_url: str,
                                                                      tmp_path: Path) -> None:
    """A real fault, not a hook: with dedup off the sidecar counts every retry again, and the demo says so."""
    config = tmp_path / "no-dedup.yaml"
    config.write_text("ingest:\n  dedup_window_seconds: 0\n", encoding="utf-8")
    result, summary = run_demo(redis_url, database_url, "--config", str(config))
    try:
        assert result.returncode == 1, result.stderr
        duplicates = summary["sent"]["duplicate_sends"]
        assert duplicates > 0
        assert summary["observed"]["total"] == summary["expected"]["total"] + duplicates
        assert f"sidecar: reported 0 duplicates but {duplicates:,} were re-sent" in summary["diff"]
    finally:
        await cleanup(redis_url, database_url, summary["pipeline"])


# ------------------------------------------------------------------------------------- the comparison
def _event(name: str, user: str, moment: datetime, n: int) -> DemoEvent:
    return DemoEvent(name, user, moment, f"m-{n}")


def test_expected_tally_counts_days_hours_and_distinct_users() -> None:
    day1, day2 = datetime(2026, 11, 26, 23, 59, tzinfo=UTC), datetime(2026, 11, 27, 0, 1, tzinfo=UTC)
    tally = expected_tally([_event("page_view", "a", day1, 1), _event("page_view", "a", day1, 2),
                            _event("signup", "b", day2, 3), _event("page_view", "a", day2, 4)])
    assert tally.types == tally.types_hourly == {"page_view": 3, "signup": 1}
    assert tally.days == {"2026-11-26": 2, "2026-11-27": 2}
    assert tally.hours == {"2026-11-26T23:00:00Z": 2, "2026-11-27T00:00:00Z": 2}
    assert tally.users == {"2026-11-26": 1, "2026-11-27": 2}
    assert tally.distinct_users == 2 and tally.total == 4


def test_compare_equal_tallies_has_no_diff() -> None:
    tally = expected_tally([_event("search", "u", NOW, 1)])
    assert compare(tally, expected_tally([_event("search", "u", NOW, 9)])) == []


def test_compare_names_every_difference() -> None:
    expected = expected_tally([_event("search", "u1", NOW, 1), _event("search", "u2", NOW, 2)])
    observed = Tally(types={"search": 2, "ghost": 1}, types_hourly={"search": 1},
                     days={"2026-11-27": 2}, hours={"2026-11-27T15:00:00Z": 3}, users={"2026-11-27": 1},
                     distinct_users=1)
    diff = compare(expected, observed, "query")
    assert "query: event type ghost: expected 0, got 1 (+1)" in diff
    assert "query: event type (hourly buckets) search: expected 2, got 1 (-1)" in diff
    assert "query: hour 2026-11-27T15:00:00Z: expected 2, got 3 (+1)" in diff
    assert "query: unique users on 2026-11-27: expected 2, got 1 (-1)" in diff
    assert "query: distinct users over the range: expected 2, got 1 (-1)" in diff
    assert len(diff) == 5  # search 2 == 2 and the day count agree, so they are not listed


def test_window_has_an_empty_bucket_of_margin_on_each_side() -> None:
    window = Window.around(NOW - WINDOW, NOW)
    assert window.first_hour == datetime(2026, 11, 25, 14, tzinfo=UTC)
    assert window.last_hour == datetime(2026, 11, 27, 16, tzinfo=UTC)
    assert window.days[0].isoformat() == "2026-11-24" and window.days[-1].isoformat() == "2026-11-28"


# ---------------------------------------------------------------------------------------- the traffic
def test_plan_is_reproducible_and_shaped_like_real_traffic() -> None:
    plan = build_plan(6000, 500, seed=42, now=NOW)
    again = build_plan(6000, 500, seed=42, now=NOW)
    other = build_plan(6000, 500, seed=43, now=NOW)
    assert [r.body() for r in plan.requests if r.style != "segment"] == \
        [r.body() for r in again.requests if r.style != "segment"]  # segment bodies carry sentAt
    assert [e.message_id for e in plan.events] != [e.message_id for e in other.events]
    assert len({e.message_id for e in plan.events}) == 6000
    assert all(NOW - WINDOW <= e.timestamp < NOW for e in plan.events)
    assert set(plan.styles()) == {"single", "track", "array", "wrapped", "segment", "posthog"}
    # Every unique event is in exactly one original request; retries only repeat earlier ones.
    originals = Counter(e.message_id for r in plan.requests if not r.retry for e in r.events)
    assert sum(originals.values()) == 6000 + sum(r.repeated for r in plan.requests)
    assert plan.duplicate_sends > 0 and any(r.retry for r in plan.requests) and any(r.repeated for r in plan.requests)
    for request in plan.requests:
        assert all(dep < request.index for dep in request.waits_for)
        if request.retry or request.repeated:
            assert request.waits_for
    # Realistic mix: page views dominate, purchases are rare, a few users are much busier than most.
    kinds = Counter(e.event for e in plan.events)
    assert kinds.most_common(1)[0][0] == "page_view" and kinds["purchase"] < kinds["add_to_cart"] < kinds["page_view"]
    per_user = Counter(e.user for e in plan.events).most_common()
    assert per_user[0][1] > 5 * per_user[-1][1]
    # Daily rhythm: the busiest hour of day sees several times the quietest one.
    by_hour = Counter(e.timestamp.hour for e in plan.events)
    assert max(by_hour.values()) > 3 * min(by_hour.values())
    assert daily_rhythm(NOW.replace(hour=16, minute=0)) == pytest.approx(1.0)


def test_segment_and_posthog_bodies_use_their_field_names() -> None:
    plan = build_plan(3000, 100, seed=7, now=NOW)
    segment = next(r for r in plan.requests if r.style == "segment" and not r.retry)
    body = orjson.loads(segment.body())
    first = body["batch"][0]
    assert {"userId", "messageId", "timestamp", "type"} <= set(first) and "user_id" not in first
    assert first["type"] in ("track", "page") and (first["type"] == "page") == ("event" not in first)
    posthog = orjson.loads(next(r for r in plan.requests if r.style == "posthog").body())
    assert {"distinct_id", "uuid", "event"} <= set(posthog["batch"][0])


# ------------------------------------------------------------------------------------ the store reads
async def test_storage_split_waits_for_a_running_flusher_and_cleanup_is_scoped(
        redis_url: str, database_url: str, pipeline: str, redis_client: aioredis.Redis) -> None:
    other = f"{pipeline}-other"
    keys, other_keys = PipelineKeys(pipeline), PipelineKeys(other)
    conn = await asyncpg.connect(database_url)
    try:
        await apply_schema(conn)
        await ensure_partitions(conn, [("analytics_daily", date(2026, 11, 1))])  # written directly below
        for name in (pipeline, other):
            await conn.execute("INSERT INTO analytics_daily (pipeline, event_type, day, count) "
                               "VALUES ($1, 'page_view', '2026-11-26', 7)", name)
        await redis_client.hset(keys.daily(NOW), mapping={"page_view": 3, "signup": 2})
        await redis_client.hset(other_keys.daily(NOW), mapping={"page_view": 100})
        await redis_client.sadd(PIPELINES_SET, pipeline)
        window = Window.around(NOW - WINDOW, NOW)
        # A flusher holds the lock: the split waits for it (no flush can move counts between its two reads).
        await redis_client.set(keys.lock, "someone-else", px=10_000)
        split_task = asyncio.create_task(storage_split(redis_client, conn, pipeline, window, wait_s=5))
        await asyncio.sleep(0.3)
        assert not split_task.done()
        await redis_client.delete(keys.lock)
        split = await asyncio.wait_for(split_task, 5)
        assert (split.postgresql, split.redis_live, split.total) == (7, 5, 12)
        assert await redis_client.get(keys.lock) is None  # released after reading
        # Cleanup removes this pipeline's keys and rows only.
        removed_keys, removed_rows = await remove_pipeline_data(redis_client, conn, pipeline)
        assert removed_keys >= 1 and removed_rows == 1
        assert not await redis_client.exists(keys.daily(NOW)) and not await redis_client.sismember(PIPELINES_SET,
                                                                                                 pipeline)
        assert await redis_client.hget(other_keys.daily(NOW), "page_view") == "100"
        assert await conn.fetchval("SELECT count FROM analytics_daily WHERE pipeline = $1", other) == 7
    finally:
        await redis_client.delete(other_keys.daily(NOW))
        await conn.execute("DELETE FROM analytics_daily WHERE pipeline = ANY($1::text[])", [pipeline, other])
        await conn.close()


# ---------------------------------------------------------------------------------------- small parts
def test_a_taken_port_is_refused_with_advice() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(DemoError, match="--port"):
            choose_port(port)
    assert choose_port(None) > 0


def test_box_table_aligns_numbers_right() -> None:
    table = box_table(["name", "n"], [["a", 1000], ["bb", 5]], [["total", 1005]], glyphs="-|+++++++++")
    lines = table.splitlines()
    assert lines[1] == "| name  |     n |"
    assert lines[3] == "| a     | 1,000 |" and lines[4] == "| bb    |     5 |"
    assert lines[6] == "| total | 1,005 |"


def test_timestamps_are_never_in_the_future() -> None:
    plan = build_plan(500, 50, seed=1)
    after = datetime.now(UTC)  # taken after the plan: however long building it took, nothing is later
    assert all(e.timestamp <= after for e in plan.events)
