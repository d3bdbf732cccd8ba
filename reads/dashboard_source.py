"""Where the dashboard's numbers come from: one consistent snapshot of ``reads/queries.py``.

``read_dashboard_data(app)`` asks ``Queries.dashboard_snapshot`` (PostgreSQL totals + live and staged
Redis buckets, exact at any instant) and turns it into the renderer's ``DashboardData``. The
PostgreSQL pool is the sidecar's shared lazy pool (``reads/database.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from analytics_pipeline.core.config import Config
from analytics_pipeline.reads.queries import ConsistencyError, DashboardSnapshot, Queries
from analytics_pipeline.sidecar.appkeys import CONFIG
from analytics_pipeline.sidecar.redis_client import redis_client

from .dashboard_model import DAYS, HOURS, DashboardData
from .database import DATABASE


class DashboardUnavailable(Exception):
    """The numbers cannot be read right now; the page answers 503 with this message."""


def from_snapshot(pipeline: str, snapshot: DashboardSnapshot, config: Config | None = None) -> DashboardData:
    """``DashboardData`` of a query snapshot; granularities switched off in ``config`` become ``None``."""
    on = set(config.counters.granularities) if config is not None else {"hourly", "daily", "user_daily"}
    hourly = {name: list(zip(snapshot.hours, values, strict=True)) for name, values in snapshot.hourly.items()}
    daily = {name: list(zip(snapshot.days, values, strict=True)) for name, values in snapshot.daily.items()}
    uniques = list(zip(snapshot.days, snapshot.uniques, strict=True))
    return DashboardData(
        pipeline=pipeline, now=snapshot.generated_at,
        hourly=hourly if "hourly" in on else None,
        daily=daily if "daily" in on else None,
        uniques=uniques if "user_daily" in on else None,
        hours=len(snapshot.hours), days=len(snapshot.days),
        distinct_users=snapshot.distinct_users if "user_daily" in on else None)


async def read_dashboard_data(app: web.Application, now: datetime | None = None) -> DashboardData:
    """One consistent snapshot of the app's pipeline: 48 hourly and 30 daily buckets, daily uniques."""
    config = app[CONFIG]
    pool = await app[DATABASE].pool(config)
    queries = Queries.for_config(redis_client(app), pool, config)
    try:
        snapshot = await queries.dashboard_snapshot(now or datetime.now(UTC), hours=HOURS, days=DAYS)
    except asyncpg.UndefinedTableError:
        raise DashboardUnavailable(
            "The PostgreSQL tables do not exist yet: run `analytics-pipeline migrate` (the flusher's CronJob "
            "does it on its first run). Events sent meanwhile are kept in Redis.") from None
    except ConsistencyError as error:
        raise DashboardUnavailable(str(error)) from None
    return from_snapshot(config.pipeline, snapshot, config)
