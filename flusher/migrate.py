"""Create or upgrade the PostgreSQL schema (tables, indexes, flush ledger) from the packaged schema.sql.

Idempotent and safe to run concurrently: the script takes a transaction-scoped advisory lock and
uses IF NOT EXISTS everywhere. Prints which objects it created, or that the schema was up to date.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import re
import sys

import asyncpg

from analytics_pipeline.core.config import Config, load_config

from .db import connect
from .errors import POSTGRES_CONNECTION_ERRORS, FlushError, ServiceUnreachable, describe

_LOCK_RE = re.compile(r"SELECT\s+pg_advisory_xact_lock\(\d+\)", re.IGNORECASE)
_OBJECT_RE = re.compile(r"CREATE\s+(TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)


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


async def apply_schema(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Apply schema.sql in one transaction; returns the ``(kind, name)`` objects it created."""
    sql = schema_sql()
    objects = schema_objects(sql)
    lock = _LOCK_RE.search(sql)
    async with conn.transaction():
        if lock:  # the same lock the script takes (they stack): look at what exists only once we hold it
            await conn.execute(lock.group(0))
        before = await _existing(conn, [name for _, name in objects])
        if all(name in before for _, name in objects):
            # Nothing to create: re-running the DDL would take table locks that can deadlock
            # with a concurrent flush transaction, for no change.
            return []
        await conn.execute(sql)
    return [(kind, name) for kind, name in objects if name not in before]


async def migrate(config: Config) -> list[tuple[str, str]]:
    """Connect with the config and apply the schema (see :func:`apply_schema`)."""
    conn = await connect(config, "analytics-pipeline migrate")
    try:
        return await apply_schema(conn)
    except POSTGRES_CONNECTION_ERRORS as error:
        raise ServiceUnreachable(f"PostgreSQL unreachable: {describe(error)}") from error
    finally:
        await conn.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``migrate`` has only the common options (``--config``; DATABASE_URL overrides)."""


def run(args: argparse.Namespace) -> int:
    """Apply the schema and print what was created."""
    config = load_config(args.config)
    try:
        created = asyncio.run(migrate(config))
    except FlushError as error:
        print(f"analytics-pipeline migrate: error: {error}", file=sys.stderr)
        return error.exit_code
    except asyncpg.PostgresError as error:
        print(f"analytics-pipeline migrate: error: {describe(error)}", file=sys.stderr)
        return 1
    if created:
        for kind, name in created:
            print(f"created {kind} {name}")
    else:
        print(f"schema up to date ({len(schema_objects())} tables and indexes present)")
    return 0
