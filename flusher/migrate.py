"""Create or upgrade the PostgreSQL schema (tables, indexes, rollups, flush ledger) from the packaged schema.sql.

Idempotent and safe to run concurrently: the script takes a transaction-scoped advisory lock, uses
IF NOT EXISTS everywhere and upgrades older layouts in guarded ``DO`` blocks (re-keys
``analytics_user_daily`` day-major, drops its retired second index, creates and back-fills the uniques
rollups); counter tables from before partitioning are converted in the same transaction, and this
month's and the next months' partitions are created. Prints what it created or changed, or that the
schema was up to date.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import re
import sys
from datetime import date

import asyncpg

from analytics_pipeline.core.config import Config, ConfigError, load_config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.postgres import connect

from .errors import POSTGRES_CONNECTION_ERRORS, FlushError, ServiceUnreachable, describe
from .partitions import PARTITIONED, ensure_partitions, missing_partitions, month_start, months_ahead, relkinds
from .store import rebuild_rollups

_LOCK_RE = re.compile(r"SELECT\s+pg_advisory_xact_lock\(\d+\)", re.IGNORECASE)
_OBJECT_RE = re.compile(r"CREATE\s+(TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)

# The layout schema.sql's upgrade block establishes (kept in step with it by tests/flusher/test_schema.py).
USER_DAILY_KEY = ("pipeline", "day", "user_id", "event_type")
RETIRED_INDEXES = ("analytics_user_daily_pipeline_day",)

_PRIMARY_KEY_SQL = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
  FROM pg_constraint c
  CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
 WHERE c.conrelid = to_regclass($1) AND c.contype = 'p'
"""


def schema_sql() -> str:
    """The schema shipped inside the package (core/schema.sql)."""
    return (importlib.resources.files("analytics_pipeline.core") / "schema.sql").read_text(encoding="utf-8")


def schema_objects(sql: str | None = None) -> list[tuple[str, str]]:
    """``(kind, name)`` of every table and index the schema declares, in order."""
    return [(kind.lower(), name) for kind, name in _OBJECT_RE.findall(sql or schema_sql())]


async def _existing(conn: asyncpg.Connection, names: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relname = ANY($1::text[])", names)
    return {row["relname"] for row in rows}


async def pending_upgrades(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Changes schema.sql would make to tables that already exist: an old-layout key, a retired index."""
    changes: list[tuple[str, str]] = []
    key = await conn.fetchval(_PRIMARY_KEY_SQL, "analytics_user_daily")
    if key is not None and tuple(key) != USER_DAILY_KEY:
        changes.append(("primary key", f"analytics_user_daily ({', '.join(USER_DAILY_KEY)})"))
    for name in sorted(await _existing(conn, list(RETIRED_INDEXES))):
        changes.append(("dropped index", name))
    kinds = await relkinds(conn, PARTITIONED)
    changes += [("partitioned", table) for table in PARTITIONED if kinds.get(table) == "r"]
    return changes


async def _today(conn: asyncpg.Connection) -> date:
    return await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")


async def _set_aside(conn: asyncpg.Connection, table: str) -> str:
    """Rename an unpartitioned counter table to ``<table>_unpartitioned`` and drop its key and indexes, so
    schema.sql can create the partitioned table under the original names; returns the new name."""
    old = f"{table}_unpartitioned"
    await conn.execute(f"ALTER TABLE {table} RENAME TO {old}")
    for row in await conn.fetch("SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype IN "
                                "('p', 'u')", old):
        await conn.execute(f'ALTER TABLE {old} DROP CONSTRAINT "{row["conname"]}"')
    for row in await conn.fetch("SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = $1::regclass",
                                old):
        await conn.execute(f"DROP INDEX {row['name']}")
    return old


async def _move_rows(conn: asyncpg.Connection, table: str, old: str) -> int:
    """Create the partitions of every month ``old`` holds, copy its rows into ``table``, drop it."""
    column = PARTITIONED[table]
    utc = f"({column} AT TIME ZONE 'UTC')" if column == "hour" else column
    months = await conn.fetch(f"SELECT DISTINCT date_trunc('month', {utc})::date AS month FROM {old}")
    await ensure_partitions(conn, [(table, month_start(row["month"])) for row in months])
    columns = await conn.fetchval("SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
                                  "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", table)
    status = await conn.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {old}")
    await conn.execute(f"DROP TABLE {old}")
    return int(status.split()[-1])


def describe_change(kind: str, name: str) -> str:
    """One line for a change :func:`apply_schema` made (``created table x``, ``dropped index y``...)."""
    if kind in ("table", "index"):
        return f"created {kind} {name}"
    if kind == "primary key":
        return f"rebuilt primary key {name}"
    if kind == "partitioned":
        return f"partitioned table {name} by month (rows moved into its partitions)"
    if kind == "partition":
        return f"created partition {name}"
    return f"{kind} {name}"


async def apply_schema(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Apply schema.sql in one transaction; returns what it did as ``(kind, name)``: the tables and
    indexes it created, then any upgrade (``("primary key", ...)``, ``("dropped index", name)``)."""
    sql = schema_sql()
    objects = schema_objects(sql)
    lock = _LOCK_RE.search(sql)
    async with conn.transaction():
        if lock:  # the same lock the script takes (they stack): look at what exists only once we hold it
            await conn.execute(lock.group(0))
        before = await _existing(conn, [name for _, name in objects])
        upgrades = await pending_upgrades(conn)
        ahead = months_ahead(await _today(conn))
        function = await conn.fetchval("SELECT to_regprocedure('analytics_create_month_partition(text, date)')")
        if (not upgrades and all(name in before for _, name in objects) and function is not None
                and not await missing_partitions(conn, ahead)):
            # Nothing to create or change: re-running the DDL would take table locks that can
            # deadlock with a concurrent flush transaction, for no change.
            return []
        await conn.execute(sql)
        # Tables of a database from before partitioning: set aside, re-created partitioned by schema.sql,
        # their rows moved over, all in this transaction (a crash or an error leaves the old layout whole).
        set_aside = {table: await _set_aside(conn, table) for table, kind in (await relkinds(conn, PARTITIONED)).items()
                     if kind == "r"}
        if set_aside:
            await conn.execute(sql)
            for table, old in set_aside.items():
                await _move_rows(conn, table, old)
        created = await ensure_partitions(conn, ahead)
    return ([(kind, name) for kind, name in objects if name not in before] + upgrades
            + [("partition", name) for name in created])


async def migrate(config: Config, rebuild: str | None = None) -> list[tuple[str, str]]:
    """Connect with the config and apply the schema (see :func:`apply_schema`); with ``rebuild`` (a
    pipeline name, or ``"all"``) also recompute those pipelines' uniques rollups from their rows."""
    conn = await connect(config, "analytics-pipeline migrate")
    try:
        changes = await apply_schema(conn)
        if rebuild is not None:
            pipelines = [rebuild] if rebuild != "all" else [row["pipeline"] for row in await conn.fetch(
                "SELECT DISTINCT pipeline FROM analytics_user_daily ORDER BY pipeline")]
            for pipeline in pipelines:
                await rebuild_rollups(conn, pipeline)
                changes.append(("rebuilt rollups of", pipeline))
        return changes
    except POSTGRES_CONNECTION_ERRORS as error:
        raise ServiceUnreachable(f"PostgreSQL unreachable: {describe(error)}") from error
    finally:
        await conn.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``migrate [--rebuild-rollups NS/NAME|all]`` plus the common options (``--config``; DATABASE_URL overrides)."""
    parser.add_argument("--rebuild-rollups", metavar="NS/NAME|all",
                        help="also recompute the uniques rollups of this pipeline (or of every pipeline) from "
                             "its per-user rows: only needed after rows were written other than by the flusher")


def run(args: argparse.Namespace) -> int:
    """Apply the schema and print what was created or changed."""
    config = load_config(args.config)
    rebuild = getattr(args, "rebuild_rollups", None)
    if rebuild not in (None, "all"):
        try:
            PipelineKeys(rebuild)
        except ValueError as error:
            raise ConfigError(f"--rebuild-rollups: {error}") from None
    try:
        created = asyncio.run(migrate(config, rebuild))
    except FlushError as error:
        print(f"analytics-pipeline migrate: error: {error}", file=sys.stderr)
        return error.exit_code
    except asyncpg.PostgresError as error:
        print(f"analytics-pipeline migrate: error: {describe(error)}", file=sys.stderr)
        return 1
    if created:
        for kind, name in created:
            print(describe_change(kind, name))
    else:
        print(f"schema up to date ({len(schema_objects())} tables and indexes present)")
    return 0
