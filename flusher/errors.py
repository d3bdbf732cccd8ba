"""Flusher failures with the exit code the CLI maps them to (2 = cannot reach a service or bad config).

The connection-error helpers live in core/errors.py (the read side shares them); re-exported here.
"""

from __future__ import annotations

from analytics_pipeline.core.errors import (
    POSTGRES_CONNECTION_ERRORS,
    REDIS_CONNECTION_ERRORS,
    ServiceUnreachable,
    describe,
)
from analytics_pipeline.core.errors import ServiceError as FlushError

__all__ = [
    "POSTGRES_CONNECTION_ERRORS",
    "REDIS_CONNECTION_ERRORS",
    "FlushError",
    "RedisMisconfigured",
    "SchemaMissing",
    "ServiceUnreachable",
    "describe",
]


class RedisMisconfigured(FlushError):
    """Redis is set up in a way that can lose acked counts (an evicting maxmemory-policy)."""

    exit_code = 2


class SchemaMissing(FlushError):
    """The tables are not there: run ``analytics-pipeline migrate`` (or ``flush --migrate``)."""

    exit_code = 2
