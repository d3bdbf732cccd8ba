"""The demo's self-check: what was acknowledged, what the query path reports, and the difference.

A :class:`Tally` holds the numbers the dashboard shows (per event type, per day, per hour, unique
users per day, distinct users). ``expected_tally`` computes it from the acknowledged events (each
``message_id`` once); ``observed_tally`` reads it from ``reads.queries`` in one consistent snapshot;
``http_tally`` reads it from the sidecar's ``/v1`` endpoints; ``compare`` lists every difference.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from analytics_pipeline.core.keys import PipelineKeys, days_between, hours_between
from analytics_pipeline.flusher.staging import Staging
from analytics_pipeline.reads.queries import Queries

from .demo_traffic import DemoEvent


def _hour_label(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00Z")


@dataclass
class Tally:
    """Counts as the dashboard shows them; zero entries are left out so tallies compare as dicts."""

    types: dict[str, int] = field(default_factory=dict)  # per event type (daily buckets)
    types_hourly: dict[str, int] = field(default_factory=dict)  # per event type, summed over hourly buckets
    days: dict[str, int] = field(default_factory=dict)  # YYYY-MM-DD -> events
    hours: dict[str, int] = field(default_factory=dict)  # YYYY-MM-DDTHH:00:00Z -> events
    users: dict[str, int] = field(default_factory=dict)  # YYYY-MM-DD -> distinct users that day
    distinct_users: int = 0  # over the whole range (not a sum of days)

    @property
    def total(self) -> int:
        return sum(self.types.values())

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    @staticmethod
    def nonzero(values: dict[str, int]) -> dict[str, int]:
        return {key: value for key, value in sorted(values.items()) if value}


def expected_tally(events: Iterable[DemoEvent]) -> Tally:
    """What an exact pipeline must report for these (unique, acknowledged) events."""
    types: Counter[str] = Counter()
    days: Counter[str] = Counter()
    hours: Counter[str] = Counter()
    users: defaultdict[str, set[str]] = defaultdict(set)
    everyone: set[str] = set()
    for event in events:
        types[event.event] += 1
        days[event.day.isoformat()] += 1
        hours[_hour_label(event.hour)] += 1
        users[event.day.isoformat()].add(event.user)
        everyone.add(event.user)
    return Tally(types=dict(sorted(types.items())), types_hourly=dict(sorted(types.items())),
                 days=dict(sorted(days.items())), hours=dict(sorted(hours.items())),
                 users={day: len(ids) for day, ids in sorted(users.items())}, distinct_users=len(everyone))


@dataclass(frozen=True)
class Window:
    """The buckets a check reads: the events' range with one empty bucket of margin on each side."""

    first_day: date
    last_day: date
    first_hour: datetime
    last_hour: datetime

    @classmethod
    def around(cls, start: datetime, end: datetime) -> Window:
        end = max(end, start)
        first_hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        last_hour = end.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return cls(start.astimezone(UTC).date() - timedelta(days=1), end.astimezone(UTC).date() + timedelta(days=1),
                   first_hour, last_hour)

    @property
    def days(self) -> list[date]:
        return days_between(self.first_day, self.last_day)

    @property
    def hours(self) -> list[datetime]:
        return hours_between(self.first_hour, self.last_hour)


async def observed_tally(queries: Queries, window: Window) -> Tally:
    """The numbers the dashboard draws, from ONE consistent snapshot (``Queries.dashboard_snapshot``)."""
    days, hours = window.days, window.hours
    now = max(window.last_hour, datetime(window.last_day.year, window.last_day.month, window.last_day.day, 23,
                                         tzinfo=UTC))
    span_hours = int((now - hours[0]).total_seconds() // 3600) + 1
    snapshot = await queries.dashboard_snapshot(now=now, hours=span_hours, days=len(days))
    hourly_sum: Counter[str] = Counter()
    per_hour: Counter[str] = Counter()
    for name, values in snapshot.hourly.items():
        for moment, count in zip(snapshot.hours, values, strict=True):
            hourly_sum[name] += count
            per_hour[_hour_label(moment)] += count
    per_day: Counter[str] = Counter()
    for values in snapshot.daily.values():
        for day, count in zip(snapshot.days, values, strict=True):
            per_day[day.isoformat()] += count
    return Tally(types=Tally.nonzero(snapshot.totals), types_hourly=Tally.nonzero(dict(hourly_sum)),
                 days=Tally.nonzero(dict(per_day)), hours=Tally.nonzero(dict(per_hour)),
                 users=Tally.nonzero({d.isoformat(): n for d, n in zip(snapshot.days, snapshot.uniques, strict=True)}),
                 distinct_users=snapshot.distinct_users)


async def http_tally(session: aiohttp.ClientSession, base_url: str, window: Window) -> Tally:
    """The same numbers through the sidecar's read endpoints (``/v1/events``, ``/v1/counts``, ``/v1/uniques``)."""
    days = {"from": window.first_day.isoformat(), "to": window.last_day.isoformat()}
    hours = {"from": _hour_label(window.first_hour), "to": _hour_label(window.last_hour), "granularity": "hour"}

    async def get(path: str, params: dict[str, str]) -> Any:
        async with session.get(base_url + path, params=params) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}: {(await response.text())[:300]}")
            return await response.json()

    types = await get("/v1/events", days)
    per_day = await get("/v1/counts", {**days, "granularity": "day"})
    per_hour = await get("/v1/counts", hours)
    uniques = await get("/v1/uniques", days)
    hourly_types: dict[str, int] = {}
    for item in types["events"]:
        series = await get("/v1/counts", {**hours, "event": item["event"]})
        hourly_types[item["event"]] = series["total"]
    return Tally(types=Tally.nonzero({e["event"]: e["count"] for e in types["events"]}),
                 types_hourly=Tally.nonzero(hourly_types),
                 days=Tally.nonzero({p["bucket"]: p["count"] for p in per_day["series"]}),
                 hours=Tally.nonzero({p["bucket"]: p["count"] for p in per_hour["series"]}),
                 users=Tally.nonzero({p["bucket"]: p["count"] for p in uniques["series"]}),
                 distinct_users=uniques["distinct_total"])


_PARTS = (("types", "event type"), ("types_hourly", "event type (hourly buckets)"), ("days", "day"),
          ("hours", "hour"), ("users", "unique users on"))


def compare(expected: Tally, observed: Tally, source: str = "query") -> list[str]:
    """Every difference between two tallies, one readable line each (empty list: they are equal)."""
    diff: list[str] = []
    for attribute, label in _PARTS:
        want: dict[str, int] = getattr(expected, attribute)
        got: dict[str, int] = getattr(observed, attribute)
        for key in sorted(set(want) | set(got)):
            w, g = want.get(key, 0), got.get(key, 0)
            if w != g:
                diff.append(f"{source}: {label} {key}: expected {w:,}, got {g:,} ({g - w:+,})")
    if expected.distinct_users != observed.distinct_users:
        diff.append(f"{source}: distinct users over the range: expected {expected.distinct_users:,}, "
                    f"got {observed.distinct_users:,} ({observed.distinct_users - expected.distinct_users:+,})")
    return diff


@dataclass
class StorageSplit:
    """Where the counts of the daily buckets are right now: PostgreSQL rows vs Redis buckets."""

    postgresql: int
    redis_live: int
    redis_staged_units: int

    @property
    def total(self) -> int:
        return self.postgresql + self.redis_live

    def as_json(self) -> dict[str, int]:
        return {"postgresql": self.postgresql, "redis_live": self.redis_live,
                "redis_inflight_units": self.redis_staged_units, "total": self.total}


async def storage_split(client: aioredis.Redis, conn: asyncpg.Connection | asyncpg.Pool, pipeline: str,
                        window: Window, *, wait_s: float = 30.0) -> StorageSplit:
    """Read each store on its own, holding the pipeline's flush lock so no (lock-respecting) flush runs between."""
    staging = Staging(client, PipelineKeys(pipeline))
    deadline = time.monotonic() + wait_s
    while (token := await staging.acquire_lock(int(wait_s * 1000))) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"another flusher held the lock of {pipeline} for {wait_s:.0f}s")
        await asyncio.sleep(0.05)
    try:
        return await _split(client, conn, pipeline, window)
    finally:
        await staging.release_lock(token)


async def _split(client: aioredis.Redis, conn: asyncpg.Connection | asyncpg.Pool, pipeline: str,
                 window: Window) -> StorageSplit:
    keys = PipelineKeys(pipeline)
    stored = await conn.fetchval("SELECT coalesce(sum(count), 0)::bigint FROM analytics_daily WHERE pipeline = $1",
                                 pipeline)
    live = 0
    for day in window.days:
        live += sum(int(v) for v in await client.hvals(keys.daily(day)))
    inflight = int(await client.zcard(keys.inflight))
    return StorageSplit(int(stored), live, inflight)
