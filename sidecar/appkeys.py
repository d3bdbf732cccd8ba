"""Typed keys of the sidecar's aiohttp application, shared by its route modules.

redis-py is named for type checkers only: importing it costs ~7 MB of resident memory, and an
ingest-only sidecar never needs it (see ``sidecar/redis_client.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from analytics_pipeline.core.config import Config

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .state import SidecarState

# The config in force (replaced in place by live reload, so read it per request).
CONFIG = web.AppKey("config", Config)
# The shared redis-py client of the read endpoints (a connection pool; decode_responses=True, timeouts
# from server.redis_timeout_seconds). create_app() puts a LazyRedis there: it behaves as the client
# and creates it (importing redis-py) on first use; redis_client(app) returns the client itself.
# Ingest never uses it (it writes over sidecar/resp.py).
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis")
# This app's Prometheus registry: route modules may register their own metrics in it.
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
# The ingest machinery (validator, group committer, metrics, draining flag).
STATE: web.AppKey[SidecarState] = web.AppKey("sidecar_state")
