"""schema.sql: shipped inside the package, idempotent, safe to apply concurrently."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from support import REPO

from analytics_pipeline.flusher.migrate import (
    RETIRED_INDEXES,
    USER_DAILY_KEY,
    apply_schema,
    schema_objects,
    schema_sql,
)
from analytics_pipeline.flusher.partitions import months_ahead, partition_name

EXPECTED_TABLES = {"analytics_daily", "analytics_hourly", "analytics_user_daily", "analytics_flush_ledger",
                   "analytics_daily_uniques", "analytics_user_last_seen", "analytics_dead_letter",
                   "analytics_dead_letter_counts", "analytics_pipeline_retention"}


def test_installed_package_reads_the_repository_schema() -> None:
    """importlib.resources (editable install) finds core/schema.sql and it is the top-level schema.sql."""
    assert schema_sql() == (REPO / "schema.sql").read_text(encoding="utf-8")
    assert {name for kind, name in schema_objects() if kind == "table"} == EXPECTED_TABLES


def test_upgrade_check_matches_the_schema() -> None:
    """migrate's "is an upgrade pending" check looks for the key and the indexes schema.sql establishes."""
    sql = schema_sql()
    table = re.search(r"CREATE TABLE IF NOT EXISTS analytics_user_daily \((.*?)\n\);", sql, re.S)
    assert table and f"PRIMARY KEY ({', '.join(USER_DAILY_KEY)})" in table.group(1)
    assert f"IS DISTINCT FROM '{','.join(USER_DAILY_KEY)}'" in sql  # the upgrade block's own check
    for name in RETIRED_INDEXES:
        assert f"DROP INDEX {name};" in sql and f"CREATE INDEX IF NOT EXISTS {name}" not in sql


def test_built_wheel_contains_the_schema(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", ".pytest_cache", ".ruff_cache", "tests", ".cache",
        "node_modules", "__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                             str(source)], capture_output=True, text=True, timeout=300)
    offline = "NewConnectionError" in result.stderr or "No matching distribution" in result.stderr
    if result.returncode != 0 and offline:
        pytest.skip(f"cannot fetch the build backend from PyPI: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    wheel = next((tmp_path / "dist").glob("analytics_pipeline-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("analytics_pipeline/core/schema.sql").decode()
    assert shipped == (REPO / "schema.sql").read_text(encoding="utf-8")


async def test_migrations_idempotent_and_concurrent(schema: str) -> None:
    """Four migrators at once on an empty schema: one creates everything, the others nothing, no errors;
    a second round creates nothing and keeps data."""
    namespace = f"ap_migrate_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(schema)
    await admin.execute(f"CREATE SCHEMA {namespace}")
    conns = [await asyncpg.connect(schema, server_settings={"search_path": namespace}) for _ in range(4)]
    try:
        created = sorted(await asyncio.gather(*(apply_schema(conn) for conn in conns)), key=len)
        assert created[:3] == [[], [], []]
        ahead = [("partition", partition_name(t, m)) for t, m in months_ahead(datetime.now(UTC).date())]
        assert created[3] == [*schema_objects(), *ahead]  # this month's and the next months' partitions too
        await conns[0].execute("INSERT INTO analytics_daily (pipeline, event_type, day, count) "
                               "VALUES ('t/x', 'e', current_date, 7)")
        assert await asyncio.gather(*(apply_schema(conn) for conn in conns)) == [[], [], [], []]
        assert await conns[1].fetchval("SELECT count FROM analytics_daily") == 7
        tables = await admin.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", namespace)
        assert {row["tablename"] for row in tables} == EXPECTED_TABLES | {name for _, name in ahead}
    finally:
        for conn in conns:
            await conn.close()
        await admin.execute(f"DROP SCHEMA {namespace} CASCADE")  # our own throwaway schema only
        await admin.close()


async def test_upgrade_from_a_schema_without_dead_letters_adds_them(schema: str) -> None:
    """A database migrated by the previous release (schema.sql up to the dead letters) gets the two tables
    and their index from `migrate`, keeps its rows, and a second migrate changes nothing."""
    full = schema_sql()
    previous = full[: full.index("-- Dead letters")]
    namespace = f"ap_upgrade_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(schema)
    await admin.execute(f"CREATE SCHEMA {namespace}")
    conn = await asyncpg.connect(schema, server_settings={"search_path": namespace})
    try:
        await conn.execute(previous)
        await conn.execute("INSERT INTO analytics_flush_ledger (pipeline, unit_id, run_id, batch, buckets, rows) "
                           "VALUES ('t/x', 'r-00001', 'r', 1, 1, 1)")
        created = await apply_schema(conn)
        # (and what partitioning adds after them: its table; the partitions, which `previous` did not create)
        assert [change for change in created if change[0] != "partition"] == [
            ("table", "analytics_dead_letter"), ("table", "analytics_dead_letter_counts"),
            ("index", "analytics_dead_letter_counts_unit"), ("table", "analytics_pipeline_retention")]
        assert await apply_schema(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM analytics_flush_ledger") == 1
    finally:
        await conn.close()
        await admin.execute(f"DROP SCHEMA {namespace} CASCADE")  # our own throwaway schema only
        await admin.close()
