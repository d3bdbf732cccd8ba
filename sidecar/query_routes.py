"""Read endpoints (/v1/counts, /v1/uniques, GET /v1/events) on the sidecar — delivered by the flusher/query issue."""

from __future__ import annotations

from aiohttp import web


def setup_query_routes(app: web.Application) -> None:
    """Register the query endpoints on ``app`` (none yet)."""
