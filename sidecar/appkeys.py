"""Typed keys of the sidecar's aiohttp application, shared by its route modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from analytics_pipeline.core.config import Config

if TYPE_CHECKING:
    from .state import SidecarState

# The config in force (replaced in place by live reload, so read it per request).
CONFIG = web.AppKey("config", Config)
# The shared Redis client (a connection pool; decode_responses=True, timeouts from server.redis_timeout_seconds).
REDIS = web.AppKey("redis", aioredis.Redis)
# This app's Prometheus registry: route modules may register their own metrics in it.
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
# The ingest machinery (validator, group committer, metrics, draining flag).
STATE: web.AppKey[SidecarState] = web.AppKey("sidecar_state")
