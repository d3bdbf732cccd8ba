"""Print counts, daily unique users and event types of a pipeline, exact at this instant.

  analytics-pipeline query counts  [--event E] [--from F] [--to T] [--granularity hour|day] [--user-id U]
  analytics-pipeline query uniques [--event E] [--from F] [--to T]
  analytics-pipeline query events  [--from F] [--to T]

F/T are dates (YYYY-MM-DD) or ISO 8601 datetimes (UTC unless an offset is given); defaults are the
last 30 days (48 hours for --granularity hour). Numbers are PostgreSQL totals plus what is still in
Redis, as the sidecar's /v1 endpoints report them. --json prints the endpoint's JSON instead of a table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import date, datetime
from typing import Any

import asyncpg
import orjson

from analytics_pipeline.core.config import Config, ConfigError, load_config
from analytics_pipeline.core.errors import (
    POSTGRES_CONNECTION_ERRORS,
    REDIS_CONNECTION_ERRORS,
    describe,
)
from analytics_pipeline.core.errors import ServiceError as FlushError
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.postgres import connect
from analytics_pipeline.core.redis_clients import RedisModeError, async_client
from analytics_pipeline.reads.queries import (
    ConsistencyError,
    Point,
    Queries,
    QueryInputError,
    parse_moment,
    resolve_range,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``query counts|uniques|events`` with their filters, ``--json`` and ``--pipeline``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pipeline", metavar="NS/NAME", help="pipeline to read (default: the config's pipeline)")
    common.add_argument("--json", action="store_true", help="print JSON (the /v1 endpoint's shape) instead of a table")
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ranged = argparse.ArgumentParser(add_help=False)
    ranged.add_argument("--from", dest="start", metavar="WHEN", help="first bucket (date or ISO datetime)")
    ranged.add_argument("--to", dest="end", metavar="WHEN", help="last bucket (default: now)")
    what = parser.add_subparsers(dest="what", metavar="counts|uniques|events", required=True)
    counts = what.add_parser("counts", parents=[common, ranged], help="event counts per hour or day")
    counts.add_argument("--event", help="one event type (default: all)")
    counts.add_argument("--granularity", choices=["hour", "day"], default="day")
    counts.add_argument("--user-id", help="only this user's events (day granularity)")
    uniques = what.add_parser("uniques", parents=[common, ranged], help="distinct users per day")
    uniques.add_argument("--event", help="users who sent this event type (default: any)")
    what.add_parser("events", parents=[common, ranged], help="event types seen, with totals")


def _iso(value: date | datetime) -> str:
    return Point(value, 0).as_json()["bucket"]


def _table(headers: tuple[str, str], rows: list[tuple[str, int]], footer: list[tuple[str, int]]) -> str:
    width = max([len(headers[0]), *(len(r[0]) for r in rows + footer)])
    numbers = max([len(headers[1]), *(len(f"{r[1]:,}") for r in rows + footer)])
    lines = [f"{headers[0]:<{width}}  {headers[1]:>{numbers}}"]
    lines += [f"{label:<{width}}  {value:>{numbers},}" for label, value in rows]
    if footer:
        lines.append("-" * (width + numbers + 2))
        lines += [f"{label:<{width}}  {value:>{numbers},}" for label, value in footer]
    return "\n".join(lines)


async def _query(args: argparse.Namespace, config: Config) -> tuple[dict[str, Any], str]:
    client = await async_client(config.redis_url, config.redis.cluster, timeout=10)
    conn = await connect(config, "analytics-pipeline query")
    try:
        queries = Queries.for_config(client, conn, config)  # type: ignore[arg-type]  # or a RedisCluster
        if args.what == "counts":
            start, end = resolve_range(args.granularity, args.start, args.end)
            series = await queries.counts(args.event, start, end, args.granularity, user_id=args.user_id)
            body = {**series.as_json(), "from": _iso(series.points[0].bucket), "to": _iso(series.points[-1].bucket)}
            rows = [(p["bucket"], p["count"]) for p in body["series"]]
            title = args.granularity
            return body, _table((title, "count"), rows, [("total", series.total)])
        if args.what == "uniques":
            start, end = resolve_range("day", args.start, args.end)
            result = await queries.uniques(args.event, start, end)
            body = {**result.as_json(), "from": _iso(result.points[0].bucket), "to": _iso(result.points[-1].bucket)}
            rows = [(p["bucket"], p["count"]) for p in body["series"]]
            return body, _table(("day", "users"), rows, [("distinct over range", result.distinct_total)])
        start_day = parse_moment("from", args.start) if args.start else None
        end_day = parse_moment("to", args.end) if args.end else None
        totals = await queries.event_types(start_day, end_day)
        body = {"events": [{"event": t.event, "count": t.count} for t in totals],
                "total": sum(t.count for t in totals)}
        return body, _table(("event", "count"), [(t.event, t.count) for t in totals], [("total", body["total"])])
    finally:
        await conn.close()
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``analytics-pipeline query``: 0, or 2 with a one-line reason."""
    config = load_config(args.config)
    if args.pipeline:
        try:
            PipelineKeys(args.pipeline)
        except ValueError as error:
            raise ConfigError(f"--pipeline: {error}") from None
        config = config.replace(pipeline=args.pipeline)
    try:
        body, table = asyncio.run(_query(args, config))
    except QueryInputError as error:
        return _fail(f"--{error.parameter.replace('_', '-')}: {error.message}")
    except (FlushError, RedisModeError) as error:
        return _fail(str(error))
    except REDIS_CONNECTION_ERRORS as error:
        return _fail(f"Redis unreachable: {describe(error)}")
    except asyncpg.UndefinedTableError:
        return _fail("the PostgreSQL tables do not exist yet: run 'analytics-pipeline migrate'")
    except POSTGRES_CONNECTION_ERRORS as error:
        return _fail(f"PostgreSQL unreachable: {describe(error)}")
    except ConsistencyError as error:
        return _fail(str(error))
    if args.json:
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
    else:
        print(table)
    return 0


def _fail(message: str) -> int:
    print(f"analytics-pipeline query: error: {message}", file=sys.stderr)
    return 2
