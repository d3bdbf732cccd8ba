"""List, retry or discard flush units the flusher set aside after they kept failing (dead letters).

  analytics-pipeline deadletter list    [--pipeline NS/NAME | --all]
  analytics-pipeline deadletter retry   [--pipeline NS/NAME] UNIT... | --every
  analytics-pipeline deadletter discard [--pipeline NS/NAME] UNIT... | --every

`retry` applies a unit's stored counts and deletes the dead letter in one PostgreSQL transaction (with
its own ledger row); `discard` deletes it. Each happens exactly once: run it again, or after a kill,
and a unit already settled is reported as "not found". stdout: one JSON object per unit.
Exit 0 when every named unit was settled (or listed), 1 when a retry failed again (the dead letter
stays), 4 when a named unit is not a dead letter, 2 when PostgreSQL is unreachable or the config is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

import asyncpg
import orjson

from analytics_pipeline.core.config import ConfigError, load_config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.postgres import connect

from . import deadletter, faults
from .errors import POSTGRES_CONNECTION_ERRORS, FlushError, describe

NOT_FOUND_EXIT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``analytics-pipeline deadletter``."""
    parser.add_argument("action", choices=["list", "retry", "discard"], help="what to do")
    parser.add_argument("units", nargs="*", metavar="UNIT", help="unit ids (as 'list' prints them)")
    parser.add_argument("--pipeline", metavar="NS/NAME", help="the pipeline (default: the config's pipeline)")
    parser.add_argument("--all", action="store_true", help="list: every pipeline's dead letters")
    parser.add_argument("--every", action="store_true", help="retry/discard: every dead letter of the pipeline")


def _emit(item: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(item).decode() + "\n")
    sys.stdout.flush()


async def _settle(conn: asyncpg.Connection, action: str, pipeline: str, unit_id: str) -> int:
    """Retry or discard one unit; prints its outcome, returns its exit code."""
    if action == "discard":
        gone = await deadletter.discard(conn, pipeline, unit_id)
        if gone is None:
            _emit({"pipeline": pipeline, "unit_id": unit_id, "result": "not_found"})
            return NOT_FOUND_EXIT
        _emit({**gone.as_dict(), "result": "discarded"})
        return 0
    try:
        result = await deadletter.retry(conn, pipeline, unit_id,
                                        in_transaction=lambda: _checkpoint("in_transaction"))
    except Exception as error:
        if not deadletter.is_unit_failure(error):
            raise
        _emit({"pipeline": pipeline, "unit_id": unit_id, "result": "failed", "error": describe(error)})
        return 1
    if result is None:
        _emit({"pipeline": pipeline, "unit_id": unit_id, "result": "not_found"})
        return NOT_FOUND_EXIT
    _emit({"pipeline": pipeline, "unit_id": unit_id, "result": "applied", "buckets": result.buckets,
           "rows": result.rows})
    return 0


async def _checkpoint(step: str) -> None:
    faults.checkpoint(step)  # ANALYTICS_FLUSH_FAULT=in_transaction: killed before COMMIT (tests)


async def main_async(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    pipeline = args.pipeline or config.pipeline
    try:
        PipelineKeys(pipeline)
    except ValueError as error:
        raise ConfigError(f"--pipeline: {error}") from None
    if args.action != "list" and not args.units and not args.every:
        raise ConfigError(f"deadletter {args.action}: name the UNIT ids (see 'deadletter list') or pass --every")
    conn = await connect(config, f"analytics-pipeline deadletter {args.action}")
    try:
        if args.action == "list":
            for item in await deadletter.pending(conn, None if args.all else pipeline):
                _emit(item.as_dict())
            return 0
        units = list(args.units) or [item.unit_id for item in await deadletter.pending(conn, pipeline)]
        code = 0
        for unit_id in units:
            code = max(code, await _settle(conn, args.action, pipeline, unit_id))
        return code
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``analytics-pipeline deadletter``."""
    try:
        return asyncio.run(main_async(args))
    except FlushError as error:
        print(f"analytics-pipeline deadletter: error: {error}", file=sys.stderr)
        return error.exit_code
    except POSTGRES_CONNECTION_ERRORS as error:
        print(f"analytics-pipeline deadletter: error: PostgreSQL unreachable: {describe(error)}", file=sys.stderr)
        return 2
    except asyncpg.UndefinedTableError as error:
        print(f"analytics-pipeline deadletter: error: schema missing ({describe(error)}): run "
              "'analytics-pipeline migrate'", file=sys.stderr)
        return 2
