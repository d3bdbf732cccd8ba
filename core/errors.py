"""Service errors shared by every process that talks to Redis or PostgreSQL (flusher, CLI, read side).

``ServiceError`` carries the exit code a CLI maps it to; ``ServiceUnreachable`` means "cannot reach
a service, nothing lost, retry later" (exit 2). The flusher calls ``ServiceError`` ``FlushError``.
"""

from __future__ import annotations

import asyncio

import asyncpg
import redis.exceptions


class ServiceError(Exception):
    """A run failed; the message is the one line shown to the operator."""

    exit_code = 1


class ServiceUnreachable(ServiceError):
    """Redis or PostgreSQL cannot be reached (or went away mid-run): nothing is lost, retry later."""

    exit_code = 2


# asyncpg raises these when the server is down, restarts, or the connection is cut.
POSTGRES_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.QueryCanceledError,
)

REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    # a Redis Cluster between a master's death and its replica's promotion: retry later, nothing is lost
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
)


def describe(error: BaseException) -> str:
    """A one-line description of an exception (type and message, no traceback), with how to fix a
    MOVED/ASK reply (a plain client on a Redis Cluster node: redis.cluster is 'off')."""
    from analytics_pipeline.core.redis_clients import mode_hint

    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text
    hint = mode_hint(error)
    return f"{text} ({hint})" if hint else text
