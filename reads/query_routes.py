"""Read endpoints on the sidecar: ``GET /v1/counts``, ``GET /v1/uniques``, ``GET /v1/events``.

Every answer comes from :mod:`analytics_pipeline.reads.queries` (PostgreSQL totals + unflushed Redis
buckets, exact at any instant). Bad parameters get 400 naming the parameter; a database or Redis
that cannot answer gets 503 with ``Retry-After``. Heavy queries (uniques, a user's counts: they read
per-user buckets) pass a :class:`QueryGate` of their kind: at most ``queries.max_concurrent`` of
each kind run at once, the others get 429 with ``Retry-After`` after waiting ``queries.wait_seconds``. Ingest never
depends on PostgreSQL: the shared pool (``reads/database.py``) opens on the first query and a
missing database only affects reads.

asyncpg, redis-py and the query module are imported by the first read request, not at start-up:
together they are ~11 MB of resident memory that an ingest-only sidecar never uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from analytics_pipeline.sidecar.appkeys import CONFIG, REGISTRY
from analytics_pipeline.sidecar.redis_client import redis_client

from .database import DATABASE, install_database

if TYPE_CHECKING:
    from analytics_pipeline.reads.queries import Queries

RETRY_AFTER_S = 5


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _bad(parameter: str, message: str) -> web.Response:
    return _json({"error": "invalid_parameter", "parameter": parameter, "message": f"{parameter}: {message}"}, 400)


def _unavailable(message: str) -> web.Response:
    return _json({"error": "unavailable", "message": message}, 503, {"Retry-After": str(RETRY_AFTER_S)})


class QueryGate:
    """Bounds the heavy queries running at once in one sidecar (a counting semaphore whose size is read
    from the config in force, so a live reload changes it); a query finding no slot in time is refused."""

    def __init__(self, refused: Any = None) -> None:
        self.running = 0
        self.waiting = 0
        self.refused = refused
        self._freed = asyncio.Condition()

    async def enter(self, limit: int, wait_seconds: float) -> bool:
        """Take a slot if fewer than ``limit`` are taken, waiting up to ``wait_seconds``; False: none free."""
        if self.running >= limit:
            self.waiting += 1
            try:
                async with asyncio.timeout(wait_seconds), self._freed:
                    await self._freed.wait_for(lambda: self.running < limit)
            except TimeoutError:
                if self.refused is not None:
                    self.refused.inc()
                return False
            finally:
                self.waiting -= 1
        self.running += 1
        return True

    async def leave(self) -> None:
        async with self._freed:
            self.running -= 1
            self._freed.notify()


# One gate per kind of heavy query, so that cheap per-user lookups never wait behind a long uniques.
HEAVY_KINDS = ("uniques", "user_counts")
QUERY_GATES: web.AppKey[dict[str, QueryGate]] = web.AppKey("query_gates")


def _too_many(kind: str, retry_after: int, limit: int) -> web.Response:
    what = "uniques" if kind == "uniques" else "per-user counts"
    return _json({"error": "too_many_queries", "message": f"{limit} {what} queries are running in this sidecar "
                  f"already (queries.max_concurrent); retry after {retry_after}s"},
                 429, {"Retry-After": str(retry_after)})


def _params(request: web.Request, allowed: set[str]) -> dict[str, str]:
    from analytics_pipeline.reads.queries import QueryInputError

    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            raise QueryInputError(name, f"unknown parameter (allowed: {', '.join(sorted(allowed))})")
        if name in params:
            raise QueryInputError(name, "given more than once")
        params[name] = value
    for name in ("event", "user_id"):
        if name in params and not params[name]:
            raise QueryInputError(name, "must not be empty (leave it out for all)")
    return params


def _iso(value: date | datetime) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value.isoformat()


async def _answer(request: web.Request, work: Callable[[Queries], Awaitable[dict[str, Any]]],
                  heavy: str | None = None) -> web.Response:
    """Run ``work`` and answer its JSON; a ``heavy`` query first takes a slot of its kind's QueryGate."""
    if heavy is None:
        return await _run(request, work)
    limits = request.app[CONFIG].queries
    gate = request.app[QUERY_GATES][heavy]
    if not await gate.enter(limits.max_concurrent, limits.wait_seconds):
        return _too_many(heavy, limits.retry_after_seconds, limits.max_concurrent)
    try:
        return await _run(request, work)
    finally:
        await gate.leave()


async def _run(request: web.Request, work: Callable[[Queries], Awaitable[dict[str, Any]]]) -> web.Response:
    import asyncpg
    import redis.exceptions

    from analytics_pipeline.core.errors import POSTGRES_CONNECTION_ERRORS, describe
    from analytics_pipeline.reads.queries import ConsistencyError, Queries, QueryInputError

    config = request.app[CONFIG]
    try:
        pool = await request.app[DATABASE].pool(config)
        return _json(await work(Queries.for_config(redis_client(request.app), pool, config)))
    except QueryInputError as error:
        return _bad(error.parameter, error.message)
    except asyncpg.UndefinedTableError:
        return _unavailable("the PostgreSQL tables do not exist yet: run 'analytics-pipeline migrate'")
    except ConsistencyError as error:
        return _unavailable(str(error))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        return _unavailable(f"Redis unavailable: {describe(error)}")
    except POSTGRES_CONNECTION_ERRORS as error:
        return _unavailable(f"PostgreSQL unavailable: {describe(error)}")


async def counts(request: web.Request) -> web.Response:
    """``GET /v1/counts?event=&from=&to=&granularity=hour|day[&user_id=]`` → series and total."""
    from analytics_pipeline.reads.queries import QueryInputError, resolve_range

    try:
        params = _params(request, {"event", "from", "to", "granularity", "user_id"})
        granularity = params.get("granularity", "day")
        if granularity not in ("hour", "day"):
            raise QueryInputError("granularity", "must be 'hour' or 'day'")
        start, end = resolve_range(granularity, params.get("from"), params.get("to"))
    except QueryInputError as error:
        return _bad(error.parameter, error.message)

    async def work(queries: Queries) -> dict[str, Any]:
        series = await queries.counts(params.get("event"), start, end, granularity,  # type: ignore[arg-type]
                                      user_id=params.get("user_id"))
        return {**series.as_json(), "from": _iso(series.points[0].bucket), "to": _iso(series.points[-1].bucket)}

    return await _answer(request, work, heavy="user_counts" if "user_id" in params else None)


async def uniques(request: web.Request) -> web.Response:
    """``GET /v1/uniques?event=&from=&to=`` → distinct users per day (and over the whole range)."""
    from analytics_pipeline.reads.queries import QueryInputError, resolve_range

    try:
        params = _params(request, {"event", "from", "to"})
        start, end = resolve_range("day", params.get("from"), params.get("to"))
    except QueryInputError as error:
        return _bad(error.parameter, error.message)

    async def work(queries: Queries) -> dict[str, Any]:
        result = await queries.uniques(params.get("event"), start, end)
        return {**result.as_json(), "from": _iso(result.points[0].bucket), "to": _iso(result.points[-1].bucket)}

    return await _answer(request, work, heavy="uniques")


async def events(request: web.Request) -> web.Response:
    """``GET /v1/events[?from=&to=]`` → every event type seen, with its total (all time by default)."""
    from analytics_pipeline.reads.queries import QueryInputError, parse_moment

    try:
        params = _params(request, {"from", "to"})
        start = parse_moment("from", params["from"]) if "from" in params else None
        end = parse_moment("to", params["to"]) if "to" in params else None
    except QueryInputError as error:
        return _bad(error.parameter, error.message)

    async def work(queries: Queries) -> dict[str, Any]:
        totals = await queries.event_types(start, end)
        return {"events": [{"event": t.event, "count": t.count} for t in totals],
                "total": sum(t.count for t in totals)}

    return await _answer(request, work)


def setup_query_routes(app: web.Application) -> None:
    """Register the query endpoints on ``app`` and its lazy PostgreSQL pool (closed on cleanup).

    ``app`` must carry ``REDIS`` (a redis-py client, or create_app's LazyRedis) and ``CONFIG``
    (see ``sidecar/appkeys.py``).
    """
    install_database(app)
    registry = app.get(REGISTRY)
    refused = Counter("analytics_sidecar_queries_refused", "Uniques and per-user count queries refused with 429 "
                      "(queries.max_concurrent of their kind were running)", ["kind"],
                      registry=registry) if registry is not None else None
    app[QUERY_GATES] = {kind: QueryGate(refused.labels(kind) if refused is not None else None)
                        for kind in HEAVY_KINDS}
    app.router.add_get("/v1/counts", counts)
    app.router.add_get("/v1/uniques", uniques)
    app.router.add_get("/v1/events", events)
