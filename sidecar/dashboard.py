"""The dashboard page (``GET /``) served by the sidecar: counts from the query module, drawn as SVG.

``setup_dashboard(app)`` registers the route. The numbers come from one provider callable,
``load_dashboard_data(app)`` by default (PostgreSQL totals + unflushed Redis through
``core/queries.py``); tests pass their own provider with known data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import orjson
import redis.exceptions
from aiohttp import web

from .appkeys import CONFIG
from .dashboard_model import DashboardData
from .dashboard_render import CONTENT_SECURITY_POLICY, RenderOptions, Theme, render_dashboard, render_error

log = logging.getLogger(__name__)

DashboardProvider = Callable[[web.Application], Awaitable[DashboardData]]
# Where the page gets its numbers; set by setup_dashboard (tests may pass their own provider).
DASHBOARD_PROVIDER = web.AppKey("dashboard_provider", DashboardProvider)

DEFAULT_REFRESH_SECONDS = 30
MIN_REFRESH_SECONDS = 5
MAX_REFRESH_SECONDS = 3600
THEMES: tuple[Theme, ...] = ("auto", "light", "dark")
# How long the page may wait for its numbers before it answers 503 (the browser simply retries).
LOAD_TIMEOUT_SECONDS = 10.0
RETRY_AFTER_SECONDS = 5


class DashboardUnavailable(Exception):
    """The numbers cannot be read right now; the page answers 503 with this message."""


class QueryModuleUnavailable(DashboardUnavailable):
    """``core/queries.py`` (the shared query module) is not installed in this build."""


def setup_dashboard(app: web.Application, provider: DashboardProvider | None = None) -> None:
    """Register ``GET /`` (the dashboard) on ``app``; ``provider`` replaces the real query path."""
    app[DASHBOARD_PROVIDER] = provider or load_dashboard_data
    app.router.add_get("/", handle_dashboard, name="dashboard")


async def load_dashboard_data(app: web.Application) -> DashboardData:
    """The dashboard's numbers from the shared query module (PostgreSQL totals + unflushed Redis)."""
    try:
        from .dashboard_source import read_dashboard_data
    except ImportError as error:  # the query module is part of another delivery
        log.error("dashboard: query module not importable: %r", error)
        raise QueryModuleUnavailable(
            f"query module not available ({error.name or error}); the sidecar still counts events"
        ) from None
    return await read_dashboard_data(app)


def _bad_parameter(field: str, reason: str) -> web.HTTPBadRequest:
    body = {"error": "invalid_request", "message": f"{field}: {reason}",
            "errors": [{"index": None, "field": field, "reason": reason}]}
    return web.HTTPBadRequest(body=orjson.dumps(body), content_type="application/json")


def parse_options(query: Mapping[str, str], ingest_url: str) -> RenderOptions:
    """Page options from the query string (``refresh``, ``theme``); HTTP 400 naming a bad one."""
    refresh = DEFAULT_REFRESH_SECONDS
    raw = query.get("refresh")
    if raw is not None:
        try:
            refresh = int(raw)
        except ValueError:
            raise _bad_parameter("refresh", f"must be a whole number of seconds, got {raw[:40]!r}") from None
        if refresh != 0 and not MIN_REFRESH_SECONDS <= refresh <= MAX_REFRESH_SECONDS:
            raise _bad_parameter("refresh", f"must be 0 (off) or between {MIN_REFRESH_SECONDS} and "
                                            f"{MAX_REFRESH_SECONDS} seconds, got {refresh}")
    theme = query.get("theme", "auto")
    if theme not in THEMES:
        raise _bad_parameter("theme", f"must be one of {', '.join(THEMES)}, got {theme[:40]!r}")
    return RenderOptions(refresh_seconds=refresh, ingest_url=ingest_url, theme=theme)  # type: ignore[arg-type]


def _ingest_url(request: web.Request) -> str:
    """The events URL as this browser reaches the sidecar (port-forwards included)."""
    host = request.host
    if not host and CONFIG in request.app:
        host = f"localhost:{request.app[CONFIG].server.port}"
    return f"{request.scheme}://{host or 'localhost:8787'}/v1/events"


def _headers(extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": CONTENT_SECURITY_POLICY,
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    headers.update(extra or {})
    return headers


async def handle_dashboard(request: web.Request) -> web.Response:
    """``GET /``: the dashboard page, or a 503 page (same look, keeps refreshing) without numbers."""
    options = parse_options(request.query, _ingest_url(request))
    provider = request.app[DASHBOARD_PROVIDER]
    try:
        async with asyncio.timeout(LOAD_TIMEOUT_SECONDS):
            data = await provider(request.app)
    except DashboardUnavailable as error:
        return _unavailable(options, str(error))
    except (TimeoutError, OSError, redis.exceptions.RedisError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as error:
        log.warning("dashboard: counts unavailable: %r", error)
        return _unavailable(options, f"Counts cannot be read right now ({type(error).__name__}); retrying.")
    page = render_dashboard(data, options)
    return web.Response(text=page, content_type="text/html", headers=_headers())


def _unavailable(options: RenderOptions, message: str) -> web.Response:
    page = render_error("Dashboard unavailable", message, options)
    return web.Response(status=503, text=page, content_type="text/html",
                        headers=_headers({"Retry-After": str(RETRY_AFTER_SECONDS)}))
