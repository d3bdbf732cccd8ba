"""The local services harness: env services when they answer, throwaway servers otherwise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import redis

from analytics_pipeline.core.services import (
    PostgresServer,
    local_services,
    postgres_answers,
    redis_answers,
)

UNREACHABLE = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"}


def test_unreachable_env_starts_throwaway_servers_and_removes_them() -> None:
    with local_services(env=dict(UNREACHABLE)) as found:
        assert found.redis_started and found.postgres_started
        assert found.redis_url != UNREACHABLE["REDIS_URL"]
        client = redis.Redis.from_url(found.redis_url)
        assert client.incr("harness-check") == 1
        client.close()

        async def roundtrip() -> int:
            connection = await asyncpg.connect(found.database_url)
            try:
                await connection.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (41)")
                return int(await connection.fetchval("SELECT n + 1 FROM t"))
            finally:
                await connection.close()

        assert asyncio.run(roundtrip()) == 42
        urls = (found.redis_url, found.database_url)
    assert not redis_answers(urls[0])
    assert not postgres_answers(urls[1])


def test_answering_env_services_are_used_as_they_are(services) -> None:  # type: ignore[no-untyped-def]
    env = {"REDIS_URL": services.redis_url, "DATABASE_URL": services.database_url}
    with local_services(env=env) as found:
        assert (found.redis_url, found.database_url) == (services.redis_url, services.database_url)
        assert not found.redis_started and not found.postgres_started


def test_postgres_survives_a_restart_with_its_data(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "pg").start()
    try:
        async def write_then_read(write: bool) -> int:
            connection = await asyncpg.connect(server.url)
            try:
                if write:
                    await connection.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
                return int(await connection.fetchval("SELECT n FROM kept"))
            finally:
                await connection.close()

        assert asyncio.run(write_then_read(True)) == 7
        server.stop()
        assert not postgres_answers(server.url)
        server.start()
        assert asyncio.run(write_then_read(False)) == 7
    finally:
        server.destroy()


def test_postgres_settings_override_the_test_defaults(tmp_path: Path) -> None:
    """Benchmarks that measure WAL and commit cost start it with production's durability settings."""
    server = PostgresServer(tmp_path / "pg", settings={"fsync": "on", "full_page_writes": "on"}).start()
    try:
        async def show() -> tuple[str, str, str]:
            connection = await asyncpg.connect(server.url)
            try:
                return tuple([str(await connection.fetchval(f"SHOW {name}"))  # type: ignore[return-value]
                              for name in ("fsync", "full_page_writes", "synchronous_commit")])
            finally:
                await connection.close()

        assert asyncio.run(show()) == ("on", "on", "off")  # named ones changed, the rest as the tests have them
    finally:
        server.destroy()


def test_redis_server_picks_another_port_when_its_free_port_was_taken(tmp_path: Path) -> None:
    """free_port() then bind is racy (parallel throwaway servers): a taken port is replaced, not fatal."""
    import socket

    from analytics_pipeline.core.services import RedisServer

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = RedisServer(tmp_path / "redis")
        taken = server.port = squatter.getsockname()[1]
        server.start()
        try:
            assert server.port != taken and redis_answers(server.url)
        finally:
            server.stop()
