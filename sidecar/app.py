"""The sidecar's aiohttp application: ``create_app(config)`` wires routes, Redis, committer and metrics.

Lifecycle: on shutdown the app is marked draining (``/readyz`` answers 503); aiohttp then waits
for the handlers in flight, and only after them the committer writes what is still pending and
the Redis connections close, so every request that was acknowledged is in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import orjson
from aiohttp import web

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.events import EventValidator
from analytics_pipeline.reads.dashboard import setup_dashboard
from analytics_pipeline.reads.query_routes import setup_query_routes

from .appkeys import CONFIG, REDIS, REGISTRY, STATE
from .committer import GroupCommitter
from .health import setup_health_routes
from .ingest import setup_ingest_routes
from .metrics import SidecarMetrics
from .redis_client import lazy_redis
from .redis_watch import setup_redis_watch
from .reload import ConfigWatcher
from .shard import pod_name
from .state import SidecarState

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    """Wrap a route handler so that an unexpected exception becomes a logged 503, never a 500."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("unexpected error in %s %s; answering 503", request.method, request.path)
            state = request.app[STATE]
            state.metrics.refused("internal_error")
            body = {"error": "internal_error", "message": "internal error; retry later", "errors": []}
            return web.Response(status=503, body=orjson.dumps(body), content_type="application/json",
                                headers={"Retry-After": str(state.config.server.retry_after_seconds)})

    return guarded


@contextlib.contextmanager
def _guarding_routes(app: web.Application) -> Iterator[None]:
    """Routes registered inside this block get their coroutine handlers wrapped with :func:`_guarded`.

    (A middleware would do the same for every request, ingest included, at a measurable cost on the
    hot path; the ingest handlers guard themselves. ``test_foreign_route_errors_become_503`` fails
    if aiohttp ever stops honouring the swapped handler.)
    """
    before = set(app.router.routes())
    yield
    for route in app.router.routes():
        if route not in before and inspect.iscoroutinefunction(route.handler):
            route._handler = _guarded(route.handler)  # type: ignore[attr-defined]


def create_app(config: Config, *, config_path: str | os.PathLike[str] | None = None,
               reload_interval: float = 2.0, fence_deadline_seconds: float | None = None) -> web.Application:
    """Build the sidecar app for ``config``; with ``config_path`` the file is watched and reloaded live."""
    # auto_decompress off: bodies are decoded by .bodies (every encoding capped, unknown ones a JSON 415).
    app = web.Application(client_max_size=config.ingest.max_request_bytes + 1,
                          handler_args={"auto_decompress": False})
    metrics = SidecarMetrics()
    # The pod's shard of counters.shards (shard 0, today's layout, when shards is 1).
    committer = GroupCommitter(config, metrics, fence_deadline_seconds=fence_deadline_seconds, pod_name=pod_name())
    state = SidecarState(config, EventValidator(config), committer, metrics)
    metrics.watch(lambda: state.in_flight, lambda: committer.pending_events, lambda: committer.writes_in_flight)
    timeout = config.server.redis_timeout_seconds
    app[CONFIG] = config
    app[STATE] = state
    app[REGISTRY] = metrics.registry
    # redis-py is loaded by the first read request (a RedisCluster when redis.cluster says so)
    app[REDIS] = lazy_redis(config.redis_url, timeout, config.redis.cluster)
    setup_redis_watch(app)
    setup_ingest_routes(app)
    with _guarding_routes(app):
        setup_health_routes(app)
        setup_query_routes(app)
        setup_dashboard(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        watcher_task = None
        if config_path is not None:
            watcher_task = asyncio.create_task(ConfigWatcher(app, config_path, reload_interval).run())
        yield
        if watcher_task is not None:
            watcher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher_task
        # Runs after aiohttp waited for in-flight handlers: drain the committer, then close Redis.
        await state.committer.close(timeout=app[CONFIG].server.shutdown_timeout_seconds)
        await app[REDIS].aclose()

    async def mark_draining(app: web.Application) -> None:
        state.draining = True

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(mark_draining)
    return app
