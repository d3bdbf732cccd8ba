"""The dashboard page (``GET /``) served by the sidecar: counts from the query module, drawn as SVG.

``setup_dashboard(app)`` registers the route. The numbers come from one provider callable,
``load_dashboard_data(app)`` by default (PostgreSQL totals + unflushed Redis through
``reads/queries.py``); tests pass their own provider with known data. Page loads that arrive
together share one read, and a read is reused for ``REUSE_SECONDS``, so many open dashboards cost
the stores no more than one.

The renderer, the query path, asyncpg and redis-py are imported by the first page load, not at
start-up: an ingest-only sidecar never needs them (~11 MB of resident memory together).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from analytics_pipeline.sidecar.appkeys import CONFIG

from .database import install_database

if TYPE_CHECKING:
    from .dashboard_model import DashboardData
    from .dashboard_render import RenderOptions, Theme

log = logging.getLogger(__name__)

DashboardProvider = Callable[[web.Application], Awaitable["DashboardData"]]

DEFAULT_REFRESH_SECONDS = 30
MIN_REFRESH_SECONDS = 5
MAX_REFRESH_SECONDS = 3600
THEMES: tuple[Theme, ...] = ("auto", "light", "dark")
# How long the page may wait for its numbers before it answers 503 (the browser simply retries).
LOAD_TIMEOUT_SECONDS = 10.0
RETRY_AFTER_SECONDS = 5
# A snapshot younger than this is served again instead of reading the stores once more.
REUSE_SECONDS = 2.0


class SharedLoader:
    """Calls the provider for the page: concurrent loads share one call, a result is reused briefly."""

    def __init__(self, provider: DashboardProvider, reuse_seconds: float) -> None:
        self.provider = provider
        self.reuse_seconds = reuse_seconds
        self.calls = 0
        self._running: asyncio.Future[DashboardData] | None = None
        self._last: tuple[float, DashboardData] | None = None

    async def load(self, app: web.Application) -> DashboardData:
        if self._last is not None and time.monotonic() - self._last[0] < self.reuse_seconds:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._call(app))
            # Retrieve the outcome even if every waiter gave up, so no "never retrieved" warning.
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        # shield: one impatient page (timeout, closed tab) must not cancel the read the others wait for.
        return await asyncio.shield(self._running)

    async def _call(self, app: web.Application) -> DashboardData:
        try:
            self.calls += 1
            data = await self.provider(app)
            self._last = (time.monotonic(), data)
            return data
        finally:
            self._running = None


# Where the page gets its numbers; set by setup_dashboard (tests may pass their own provider).
DASHBOARD_LOADER = web.AppKey("dashboard_loader", SharedLoader)


def setup_dashboard(app: web.Application, provider: DashboardProvider | None = None,
                    reuse_seconds: float | None = None) -> None:
    """Register ``GET /`` (the dashboard) on ``app``; ``provider`` replaces the real query path."""
    if provider is None:
        install_database(app)
        provider = load_dashboard_data
    app[DASHBOARD_LOADER] = SharedLoader(provider, REUSE_SECONDS if reuse_seconds is None else reuse_seconds)
    app.router.add_get("/", handle_dashboard, name="dashboard")


async def load_dashboard_data(app: web.Application) -> DashboardData:
    """The dashboard's numbers from the shared query module (PostgreSQL totals + unflushed Redis)."""
    from .dashboard_source import read_dashboard_data

    return await read_dashboard_data(app)


def _bad_parameter(field: str, reason: str) -> web.HTTPBadRequest:
    body = {"error": "invalid_request", "message": f"{field}: {reason}",
            "errors": [{"index": None, "field": field, "reason": reason}]}
    return web.HTTPBadRequest(text=orjson.dumps(body).decode(), content_type="application/json")


def parse_options(query: Mapping[str, str], ingest_url: str) -> RenderOptions:
    """Page options from the query string (``refresh``, ``theme``); HTTP 400 naming a bad one."""
    from .dashboard_render import RenderOptions

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
    from .dashboard_render import CONTENT_SECURITY_POLICY

    headers = {"Cache-Control": "no-store", "Content-Security-Policy": CONTENT_SECURITY_POLICY,
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    headers.update(extra or {})
    return headers


async def handle_dashboard(request: web.Request) -> web.Response:
    """``GET /``: the dashboard page, or a 503 page (same look, keeps refreshing) without numbers."""
    import asyncpg
    import redis.exceptions

    from .dashboard_render import render_dashboard
    from .dashboard_source import DashboardUnavailable

    options = parse_options(request.query, _ingest_url(request))
    loader = request.app[DASHBOARD_LOADER]
    try:
        async with asyncio.timeout(LOAD_TIMEOUT_SECONDS):
            data = await loader.load(request.app)
    except DashboardUnavailable as error:
        return _unavailable(options, str(error))
    except (TimeoutError, OSError, redis.exceptions.RedisError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as error:
        log.warning("dashboard: counts unavailable: %r", error)
        return _unavailable(options, f"Counts cannot be read right now ({type(error).__name__}); retrying.")
    response = web.Response(text=render_dashboard(data, options), content_type="text/html", headers=_headers())
    response.enable_compression()  # ~120 KiB of repetitive SVG shrinks about tenfold when the browser accepts it
    return response


def _unavailable(options: RenderOptions, message: str) -> web.Response:
    from .dashboard_render import render_error

    page = render_error("Dashboard unavailable", message, options)
    return web.Response(status=503, text=page, content_type="text/html",
                        headers=_headers({"Retry-After": str(RETRY_AFTER_SECONDS)}))
