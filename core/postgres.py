"""PostgreSQL connections for the flusher, the CLI and the read side: UTC sessions, timeouts, clear errors."""

from __future__ import annotations

import asyncpg

from analytics_pipeline.core.config import Config

from .errors import POSTGRES_CONNECTION_ERRORS, ServiceUnreachable, describe

CONNECT_TIMEOUT_S = 10.0


def server_settings(config: Config, application_name: str) -> dict[str, str]:
    """Session settings: UTC (day boundaries are UTC everywhere) and the configured statement timeout."""
    timeout_ms = int(config.flush.statement_timeout_seconds * 1000)
    return {"timezone": "UTC", "statement_timeout": str(timeout_ms), "application_name": application_name}


async def connect(config: Config, application_name: str = "analytics-pipeline") -> asyncpg.Connection:
    """One connection to ``config.database_url``; ServiceUnreachable (one line) if it cannot be had."""
    try:
        return await asyncpg.connect(
            config.database_url, timeout=CONNECT_TIMEOUT_S,
            command_timeout=config.flush.statement_timeout_seconds + 5,
            server_settings=server_settings(config, application_name))
    except POSTGRES_CONNECTION_ERRORS as error:
        raise ServiceUnreachable(f"PostgreSQL unreachable: {describe(error)}") from error
    except asyncpg.PostgresError as error:  # wrong password, no such database or role, too many clients
        raise ServiceUnreachable(f"PostgreSQL refused the connection: {describe(error)}") from error


async def create_pool(config: Config, application_name: str, *, max_size: int = 4) -> asyncpg.Pool:
    """A small lazy pool (no connection until first use), for long-running readers like the sidecar."""
    pool = asyncpg.create_pool(
        config.database_url, min_size=0, max_size=max_size, timeout=CONNECT_TIMEOUT_S,
        command_timeout=config.flush.statement_timeout_seconds + 5,
        server_settings=server_settings(config, application_name))
    return await pool
